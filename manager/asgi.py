"""ASGI entry point: Django for HTTP, the realtime sockets for websockets (daphne serves it).

Websockets are accepted only from the manager's own origins, scheme, host and port
(manager.realtime.origins), before the session is even read. Caddy's wake subrequest for a
sleeping instance (instances.wake, at instances.proxy.WAKE_PATH) is answered before Django.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from instances import proxy, wake  # noqa: E402
from manager.realtime.origins import ManagerOriginOnly  # noqa: E402
from manager.realtime.routing import websocket_urlpatterns  # noqa: E402


async def http_app(scope, receive, send):
    if scope["path"] == proxy.WAKE_PATH:
        return await wake.application(scope, receive, send)
    return await django_asgi_app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": ManagerOriginOnly(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
