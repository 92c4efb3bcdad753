"""ASGI entry point: Django for HTTP, the realtime sockets for websockets (daphne serves it).

Websockets are accepted only from the manager's own origins, scheme, host and port
(manager.realtime.origins), before the session is even read.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from manager.realtime.origins import ManagerOriginOnly  # noqa: E402
from manager.realtime.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": ManagerOriginOnly(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
