"""Kiosk lobby pages, seat board and launchers (filled by the lobby issue)."""
