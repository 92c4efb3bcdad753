"""The kiosk socket: `/ws/lobby/<instance>/<room>/?label=<participant label>`.

Anonymous (lab computers have no login), so it can do nothing but be one seat's page: it
marks its own seat present (waiting) while open, pings to stay present, and is told its
seat's state, the gate, when to go to the room and when it was reset. Everything it may
change is its own seat's presence; the rules live in lobby.services. The experimenter's
board does not use this socket: it subscribes to the permission-checked topic
`lobby:<instance>` on /ws/live/ (see lobby/realtime.py).
"""

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from lobby import services


def _resolve(instance: str, room: str, label: str):
    """(room id, oTree room URL of the seat) or None when there is no such seat."""
    try:
        ref = services.find_seat(instance, room, label)
        return ref.row.pk, services.room_url(ref.instance, ref.name, label)
    except services.LobbyNotFound:
        return None


class KioskConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        kwargs = self.scope["url_route"]["kwargs"]
        query = parse_qs(self.scope.get("query_string", b"").decode("utf-8", "replace"))
        label = (query.get("label") or [""])[0]
        found = await database_sync_to_async(_resolve)(kwargs["instance"], kwargs["room"], label) if label else None
        if found is None:
            await self.close(code=4404)  # no such seat: handshake refused
            return
        self.room_id, self.url = found
        self.label = label
        self.group = services.kiosk_group(self.room_id)
        await self.accept()
        await self.channel_layer.group_add(self.group, self.channel_name)
        snapshot = await database_sync_to_async(services.kiosk_connected)(self.room_id, label, self.channel_name)
        self.gate = snapshot["gate"]
        if snapshot["seat"] == services.State.ENTERED:
            snapshot["url"] = self.url  # a page that was waiting when the gate opened goes in now
        await self.send_json(snapshot)

    async def disconnect(self, code):
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)
            await database_sync_to_async(services.kiosk_disconnected)(self.room_id, self.label, self.channel_name)

    async def receive_json(self, content, **kwargs):
        if isinstance(content, dict) and content.get("type") == "ping":
            await database_sync_to_async(services.kiosk_ping)(self.room_id, self.label, self.channel_name)
            await self.send_json({"type": "pong"})
        else:
            await self.send_json({"type": "error", "detail": "a kiosk only sends pings"})

    async def push(self, message):
        """Room-wide events from lobby.services; each kiosk picks out what concerns its seat."""
        event = message["event"]
        if event["type"] == "gate":
            self.gate = "open" if event["open"] else "held"
            if self.label in event["entered"]:
                await self.send_json({"type": "go", "url": self.url})
            else:
                await self.send_json({"type": "gate", "gate": self.gate})
        elif event["type"] == "reset" and (event["labels"] is None or self.label in event["labels"]):
            self.gate = event["gate"]
            await self.send_json({"type": "state", "seat": services.State.WAITING, "gate": self.gate})
