"""The websocket routes: the shared live socket, then what each app registers from its
AppConfig.ready (`register`), so this module imports no app; manager.asgi serves the list."""

from django.urls import path

from manager.realtime.consumers import LiveConsumer

websocket_urlpatterns = [
    path("ws/live/", LiveConsumer.as_asgi()),
]


def register(route: str, consumer) -> None:
    """Serve `consumer` (a Channels consumer class) at `route` (a Django path pattern)."""
    if not any(str(pattern.pattern) == route for pattern in websocket_urlpatterns):
        websocket_urlpatterns.append(path(route, consumer.as_asgi()))
