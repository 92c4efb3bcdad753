import asyncio

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from manager.realtime import topics
from manager.realtime.services import recent_notifications, user_group


class LiveConsumer(AsyncJsonWebsocketConsumer):
    """One socket per browser tab. Joins the user's own group on connect; other groups
    only through `{"subscribe": topic}` after the topic registry allowed it; streams what
    a follower the apps registered yields (`topics.register_follower`). Knows no domain."""

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_active:
            await self.close()  # handshake refused (HTTP 403)
            return
        self.user = user
        self.groups_joined: set[str] = set()
        self.followers: dict[str, asyncio.Task] = {}
        await self.accept()
        await self._join(user_group(user.pk))
        await self.send_json({"type": "hello", "user": user.username})
        # Replay what this user was told moments ago: a tab that was loading a page then
        # (e.g. the redirect after the form that started a task) shows it now; tabs skip
        # ids they have shown already.
        for event in await sync_to_async(recent_notifications)(user.pk):
            await self.send_json(event)

    async def disconnect(self, code):
        for task in getattr(self, "followers", {}).values():
            task.cancel()
        for group in getattr(self, "groups_joined", set()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        if not isinstance(content, dict):
            await self.send_json({"type": "error", "detail": "messages must be JSON objects"})
            return
        if "subscribe" in content:
            topic = content["subscribe"]
            group = await database_sync_to_async(topics.resolve)(self.user, topic)
            if group is None:
                await self.send_json({"type": "error", "detail": f"cannot subscribe to {topic!r}"})
                return
            await self._join(group)
            await self.send_json({"type": "subscribed", "topic": topic})
            # Joined first: whatever changes from now on arrives as well.
            current = await database_sync_to_async(topics.snapshot)(self.user, topic)
            if current is not None:
                await self.send_json(current)
        elif (start := topics.follower(content)) is not None:
            try:
                key, stream, message = start(self.user, content)
            except ValueError as exc:
                await self.send_json({"type": "error", "detail": str(exc)})
                return
            self._start_follower(key, stream, message)
        elif "unfollow_logs" in content:
            task = self.followers.pop(str(content["unfollow_logs"]), None)
            if task:
                task.cancel()
        elif content.get("type") == "ping":
            await self.send_json({"type": "pong"})
        else:
            await self.send_json({"type": "error", "detail": "unknown message"})

    def _start_follower(self, key, stream, message):
        """Send `message(item)` for each item of the async generator `stream`, replacing
        the follower already under `key`; a PermissionError ends it with an error message."""
        old = self.followers.pop(key, None)
        if old:
            old.cancel()

        async def pump():
            try:
                async for item in stream:
                    await self.send_json(message(item))
            except PermissionError as exc:
                await self.send_json({"type": "error", "detail": str(exc)})

        self.followers[key] = asyncio.ensure_future(pump())

    async def _join(self, group):
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined.add(group)

    async def push(self, message):
        await self.send_json(message["event"])
