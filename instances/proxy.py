"""The front door to the instances (Caddy, driven through its admin API).

Filled by the reverse-proxy work: `sync_routes()` rebuilds Caddy's whole configuration
from the database (never hand-edited), so a restart of the manager or of Caddy restores
every route.
"""


def sync_routes() -> None:
    """Rebuild the proxy's routes from the database. Until the proxy exists: nothing to do."""
    return None
