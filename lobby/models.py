"""Lobby state: per instance its settings (welcome text), per room its gate, per seat its
state. Rows are made on first use; the rooms and labels themselves come from the live
release (`Release.rooms`), so a room or label that a new release drops simply stops
being shown."""

from django.db import models
from django.utils import timezone

from instances.models import Instance

WELCOME_MAX = 2000


class LobbySettings(models.Model):
    """Per-instance lobby settings (OneToOne: the instances app's model stays untouched)."""

    instance = models.OneToOneField(Instance, on_delete=models.CASCADE, related_name="lobby_settings")
    welcome_text = models.TextField(blank=True, max_length=WELCOME_MAX)  # empty: the default text in the language
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"lobby settings of {self.instance.name}"


class LobbyRoom(models.Model):
    """One oTree room's lobby: is the gate open (ready seats enter at once) or held?"""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="lobby_rooms")
    name = models.CharField(max_length=200)
    gate_open = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["instance", "name"], name="lobby_room_unique")]

    def __str__(self):
        return f"{self.instance.name}/{self.name} ({'open' if self.gate_open else 'held'})"


class Seat(models.Model):
    """One participant label's kiosk. `offline`: no lobby page open for it; `waiting`: its
    page is open; `ready`: the participant clicked "I am ready" (the gate is held);
    `entered`: the browser was sent to the oTree room."""

    class State(models.TextChoices):
        OFFLINE = "offline"
        WAITING = "waiting"
        READY = "ready"
        ENTERED = "entered"

    room = models.ForeignKey(LobbyRoom, on_delete=models.CASCADE, related_name="seats")
    label = models.CharField(max_length=200)
    state = models.CharField(max_length=10, choices=State.choices, default=State.OFFLINE)
    changed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["room", "label"], name="lobby_seat_unique")]

    def __str__(self):
        return f"{self.room.instance.name}/{self.room.name}/{self.label} [{self.state}]"
