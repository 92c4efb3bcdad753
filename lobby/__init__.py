"""Kiosk lobby: public seat pages for lab computers, the experimenter's live seat board
with the gate, and kiosk launchers."""
