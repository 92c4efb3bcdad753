"""The board's realtime topic `lobby:<instance>`: owner and lab managers only (checked
here, beside the data, before the live socket joins the group); and the kiosk socket's
route."""

from instances.selectors import visible_instances
from lobby.consumers import KioskConsumer
from lobby.services import board_group
from manager.realtime import routing, topics


def _lobby_topic(user, name):
    instance = visible_instances(user).filter(name=name).first()
    return board_group(instance.pk) if instance else None


topics.register("lobby", _lobby_topic)
routing.register("ws/lobby/<slug:instance>/<str:room>/", KioskConsumer)  # kiosk seats (anonymous)
