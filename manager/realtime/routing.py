from django.urls import path

from lobby.consumers import KioskConsumer
from manager.realtime.consumers import LiveConsumer

websocket_urlpatterns = [
    path("ws/live/", LiveConsumer.as_asgi()),
    path("ws/lobby/<slug:instance>/<str:room>/", KioskConsumer.as_asgi()),  # kiosk seats (anonymous)
]
