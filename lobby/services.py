"""Every rule of the kiosk lobby: which rooms and seats exist, seat states, the gate,
resets, the welcome text, and presence (which seats have a lobby page open).

Rooms and participant labels come from the instance's live release. Seat states live in
the database (`Seat`); which kiosk pages are open lives in Redis (one sorted set of socket
names per seat, refreshed by the kiosks' pings), so a manager killed without closing its
sockets cannot leave seats "waiting" for ever: stale entries expire after PRESENCE_TTL.

Realtime: kiosks of a room listen on `lobby.kiosks.<room id>`; the experimenter's board
(owner and lab managers, via the topic `lobby:<instance>`) on `lobby.board.<instance id>`.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from instances import facts, sleep
from instances.models import Instance
from instances.selectors import can_see
from lobby import texts as catalogue
from lobby.models import WELCOME_MAX, LobbyRoom, LobbySettings, Seat
from manager.accounts.services import NotAllowed
from manager.audit.services import record
from manager.realtime.services import send_to_group
from manager.texts import check_text, problem

# A seat name typed into the picker of a room without participant labels.
FREE_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$")
MAX_FREE_SEATS = 300  # per room without participant labels (the picker makes seats on demand)
PRESENCE_TTL = 30  # seconds a kiosk socket counts as open without a ping (kiosks ping every 10 s)

State = Seat.State


class LobbyNotFound(Exception):
    """Unknown instance, room or seat: shown as a 404 page (in `language`, when known)."""

    def __init__(self, message: str, language: str = ""):
        super().__init__(message)
        self.language = language


@dataclass
class RoomRef:
    """A room of an instance's live release, and its lobby row."""

    instance: Instance
    name: str
    display_name: str
    labels: list[str]
    language: str
    row: LobbyRoom = field(repr=False)

    @property
    def has_labels(self) -> bool:
        return bool(self.labels)


# --- finding rooms and seats ---------------------------------------------------------------

def live_rooms(instance: Instance) -> tuple[list[dict], str]:
    """The rooms of the live release ([{name, display_name, participant_labels}]) and its
    language. A release recorded before its rooms were checked (instances.facts) may hold
    a name that is no URL segment, or labels by the thousand: those rooms and labels are
    left out here too, so no page breaks on them."""
    live = instance.live_release
    if live is None:
        return [], ""
    return facts.usable_rooms(live.rooms), live.language_code or ""


def find_instance(name: str) -> tuple[Instance, list[dict], str]:
    valid = not problem(name, max_length=200, single_line=True)  # else no instance has it (PostgreSQL: no query)
    instance = Instance.objects.filter(name=name, delete_requested=False).first() if valid else None
    rooms, language = live_rooms(instance) if instance else ([], "")
    if instance is None or not rooms:
        raise LobbyNotFound(f"There is no lobby at this address: no instance named “{name}” with deployed rooms.")
    return instance, rooms, language


def room_ref(instance: Instance, room: dict, language: str) -> RoomRef:
    row, _ = LobbyRoom.objects.get_or_create(instance=instance, name=room["name"])
    labels = [str(label) for label in room.get("participant_labels") or []]
    return RoomRef(instance, room["name"], room.get("display_name") or room["name"], labels, language, row)


def find_room(instance_name: str, room_name: str) -> RoomRef:
    instance, rooms, language = find_instance(instance_name)
    for room in rooms:
        if room["name"] == room_name:
            return room_ref(instance, room, language)
    raise LobbyNotFound(f"Instance “{instance_name}” has no room named “{room_name}”.", language)


def check_label(ref: RoomRef, label: str) -> str:
    """`label` if it is a seat of this room: one of its participant labels, or (a room
    without labels) a valid seat name; else LobbyNotFound saying why."""
    if ref.has_labels:
        if label not in ref.labels:
            raise LobbyNotFound(f"Room “{ref.name}” has no seat “{label}” (it is not one of its participant labels).",
                                ref.language)
        return label
    if not FREE_LABEL_RE.match(label):
        raise LobbyNotFound(f"“{label}” is not a seat name: " + catalogue.texts("en")["bad_label"], ref.language)
    if not ref.row.seats.filter(label=label).exists() and ref.row.seats.count() >= MAX_FREE_SEATS:
        raise LobbyNotFound(f"Room “{ref.name}” already has {MAX_FREE_SEATS} seats; reset it before adding more.",
                            ref.language)
    return label


def find_seat(instance_name: str, room_name: str, label: str) -> RoomRef:
    ref = find_room(instance_name, room_name)
    check_label(ref, label)
    return ref


# --- URLs ---------------------------------------------------------------------------------------

def room_url(instance: Instance, room: str, label: str) -> str:
    """oTree's room URL for this seat: <instance url>room/<room>/?participant_label=<label>
    &welcome_page_ok=1. The lobby is the room's welcome page: without that flag oTree 6
    shows its own one ("Start") and counts the participant present only after a second
    click; older oTree versions ignore it."""
    if not instance.url:
        raise LobbyNotFound(f"Instance “{instance.name}” has no public address yet.")
    return f"{instance.url}room/{quote(room, safe='')}/?participant_label={quote(label, safe='')}&welcome_page_ok=1"


def lobby_path(instance_name: str, room: str | None = None, label: str | None = None) -> str:
    path = f"/lobby/{instance_name}/"
    if room is not None:
        path += f"{quote(room, safe='')}/"
    if label is not None:
        path += f"{quote(label, safe='')}/"
    return path


def lobby_url(instance_name: str, room: str | None = None, label: str | None = None) -> str:
    return settings.LAB_PUBLIC_URL + lobby_path(instance_name, room, label)


# --- groups and pushes ----------------------------------------------------------------------------

def kiosk_group(room_id: int) -> str:
    return f"lobby.kiosks.{room_id}"


def board_group(instance_id: int) -> str:
    return f"lobby.board.{instance_id}"


def push_board(room: LobbyRoom) -> None:
    """Tell open boards of this instance that this room changed (they fetch it again)."""
    send_to_group(board_group(room.instance_id), {"type": "lobby", "instance": room.instance.name,
                                                  "room": room.name})


# --- presence (Redis) ------------------------------------------------------------------------------

def _presence_key(room_id: int, label: str) -> str:
    return f"lab:lobby:presence:{room_id}:{hashlib.sha256(label.encode()).hexdigest()[:24]}"


def _redis():
    from manager.locks import client

    return client()


def _seen(room_id: int, label: str, channel: str) -> None:
    key = _presence_key(room_id, label)
    _redis().pipeline().zadd(key, {channel: time.time()}).expire(key, PRESENCE_TTL * 2).execute()


def _open_pages(room_id: int, labels: list[str]) -> dict[str, bool]:
    """label -> does a kiosk page of it have a live socket (pinged within PRESENCE_TTL)?"""
    if not labels:
        return {}
    cutoff = time.time() - PRESENCE_TTL
    pipe = _redis().pipeline()
    for label in labels:
        key = _presence_key(room_id, label)
        pipe.zremrangebyscore(key, 0, cutoff)
        pipe.zcard(key)
    counts = pipe.execute()[1::2]
    return {label: count > 0 for label, count in zip(labels, counts)}


def _set_state(room: LobbyRoom, label: str, state: str, only_from: tuple[str, ...] | None = None) -> bool:
    """Set one seat's state (making its row); with `only_from`, only from those states.
    True when it changed."""
    seat, _ = Seat.objects.get_or_create(room=room, label=label)
    if seat.state == state or (only_from is not None and seat.state not in only_from):
        return False
    updated = Seat.objects.filter(pk=seat.pk, state=seat.state).update(state=state, changed_at=timezone.now())
    return bool(updated)


def kiosk_snapshot(room: LobbyRoom, label: str) -> dict:
    seat = Seat.objects.filter(room=room, label=label).first()
    return {"type": "state", "seat": seat.state if seat else State.OFFLINE,
            "gate": "open" if room.gate_open else "held"}


def kiosk_connected(room_id: int, label: str, channel: str) -> dict:
    """A kiosk page's socket is up: an offline seat becomes waiting. Returns its state."""
    room = LobbyRoom.objects.select_related("instance").get(pk=room_id)
    _seen(room_id, label, channel)
    if _set_state(room, label, State.WAITING, only_from=(State.OFFLINE,)):
        push_board(room)
    return kiosk_snapshot(room, label)


def kiosk_ping(room_id: int, label: str, channel: str) -> None:
    _seen(room_id, label, channel)


def kiosk_disconnected(room_id: int, label: str, channel: str) -> None:
    """A kiosk socket closed: a waiting seat without any other open page goes offline."""
    _redis().zrem(_presence_key(room_id, label), channel)
    room = LobbyRoom.objects.select_related("instance").filter(pk=room_id).first()
    if room is None or _open_pages(room_id, [label])[label]:
        return
    if _set_state(room, label, State.OFFLINE, only_from=(State.WAITING,)):
        push_board(room)


# --- seats others hold ------------------------------------------------------------------------------

# Apps that put someone else than a person at a seat register here (bots: bots.apps registers
# bots.seats.bot_seats): callables room -> {label: {"run": number, "status", "page", ...}}.
# The lobby builds on nobody: bots build on the lobby, not the other way round.
SEAT_HOLDERS: list = []


def held_seats(room) -> dict[str, dict]:
    """label -> what holds the seat (a bot run's bot), for every registered holder."""
    found: dict[str, dict] = {}
    for holder in SEAT_HOLDERS:
        found.update(holder(room))
    return found


# --- what participants do ---------------------------------------------------------------------------

def wake_for(ref: RoomRef) -> None:
    """A kiosk page of the room opened: a sleeping instance starts waking now (in the
    background), so its app is up when the gate opens (instances.sleep)."""
    sleep.wake_soon(ref.instance.name, f"the lobby of room {ref.name}")


def mark_ready(ref: RoomRef, label: str) -> tuple[str, str | None]:
    """"I am ready": with the gate open the seat enters at once (returns ("entered", room
    URL)); with the gate held it is ready and waits (("ready", None)).

    The seat is written ready BEFORE the gate is read, and opening the gate writes the gate
    BEFORE it reads the ready seats: whichever comes second sees the other, so a seat can
    never stay ready behind an open gate."""
    url = room_url(ref.instance, ref.name, label)
    room = ref.row
    if label in held_seats(room):
        # A bot plays at this seat: in the room this label is the bot's participant. The
        # kiosk waits (the board shows the seat as the bot's); nothing is written.
        return State.READY, None
    seat, _ = Seat.objects.get_or_create(room=room, label=label)
    if seat.state == State.ENTERED:  # back from the room (e.g. the browser was restarted): in again
        return State.ENTERED, url
    Seat.objects.filter(pk=seat.pk).update(state=State.READY, changed_at=timezone.now())
    room.refresh_from_db(fields=["gate_open"])
    state = State.READY
    if room.gate_open:
        Seat.objects.filter(pk=seat.pk, state=State.READY).update(state=State.ENTERED, changed_at=timezone.now())
        state = State.ENTERED
    push_board(room)
    return state, (url if state == State.ENTERED else None)


# --- what the experimenter does ---------------------------------------------------------------------

def can_manage(user, instance: Instance) -> bool:
    return bool(user.is_authenticated and can_see(user, instance))


def _check(user, instance: Instance) -> None:
    if not can_manage(user, instance):
        raise NotAllowed("Only the instance's owner and lab managers may run its lobby.")


def set_gate(user, ref: RoomRef, open_: bool, request=None) -> list[str]:
    """Open or hold the room's gate. Opening sends every ready seat into the room at once
    (their kiosks are told in one group message); returns the labels that entered."""
    _check(user, ref.instance)
    if open_:  # the seats go to the app now: a sleeping instance wakes first (seconds)
        sleep.wake_quietly(ref.instance.name, f"the lobby of room {ref.name} (its gate opened)")
    room = ref.row
    LobbyRoom.objects.filter(pk=room.pk).update(gate_open=open_, updated_at=timezone.now())
    room.gate_open = open_
    entered: list[str] = []
    if open_:
        with transaction.atomic():
            ready = Seat.objects.select_for_update().filter(room=room, state=State.READY)
            entered = list(ready.values_list("label", flat=True))
            Seat.objects.filter(room=room, label__in=entered, state=State.READY).update(
                state=State.ENTERED, changed_at=timezone.now())
    send_to_group(kiosk_group(room.pk), {"type": "gate", "open": open_, "entered": entered})
    push_board(room)
    record(user, "lobby.gate", ref.instance,
           f"{'opened' if open_ else 'held'} the lobby gate of room {ref.name} of {ref.instance.name}"
           + (f" ({len(entered)} seats entered)" if open_ else ""), request, room=ref.name)
    return entered


def reset(user, ref: RoomRef, label: str | None = None, request=None) -> int:
    """Reset one seat (or all seats) of the room: back to the welcome page; seats whose
    page is open are waiting again, the others offline. Returns how many seats changed."""
    _check(user, ref.instance)
    room = ref.row
    if label is not None and problem(label, max_length=200):
        raise LobbyNotFound(f"Room “{ref.name}” has no such seat.")
    if label is not None and label not in ref.labels and not room.seats.filter(label=label).exists():
        raise LobbyNotFound(f"Room “{ref.name}” has no seat “{label}”.")
    seats = room.seats.all() if label is None else room.seats.filter(label=label)
    labels = list(seats.values_list("label", flat=True))
    pages = _open_pages(room.pk, labels)
    now = timezone.now()
    online = [lab for lab in labels if pages.get(lab)]
    changed = seats.filter(label__in=online).exclude(state=State.WAITING).update(state=State.WAITING, changed_at=now)
    changed += seats.exclude(label__in=online).exclude(state=State.OFFLINE).update(state=State.OFFLINE, changed_at=now)
    send_to_group(kiosk_group(room.pk), {"type": "reset", "labels": None if label is None else [label],
                                         "gate": "open" if room.gate_open else "held"})
    push_board(room)
    what = "all seats" if label is None else f"seat {label}"
    record(user, "lobby.reset", ref.instance, f"reset {what} of room {ref.name} of {ref.instance.name}", request,
           room=ref.name, label=label)
    return changed


def lobby_settings(instance: Instance) -> LobbySettings:
    found = LobbySettings.objects.filter(instance=instance).first()
    return found or LobbySettings(instance=instance)


def welcome_text(instance: Instance, language: str) -> str:
    return lobby_settings(instance).welcome_text.strip() or catalogue.texts(language)["default_welcome"]


def set_welcome_text(user, instance: Instance, text: str, request=None) -> LobbySettings:
    from django.core.exceptions import ValidationError

    _check(user, instance)
    text = check_text(text or "", field="welcome_text", label="The welcome text").replace("\r\n", "\n").strip()
    if len(text) > WELCOME_MAX:
        raise ValidationError({"welcome_text": [f"At most {WELCOME_MAX} characters (this one has {len(text)})."]})
    settings_row, _ = LobbySettings.objects.get_or_create(instance=instance)
    settings_row.welcome_text = text
    settings_row.save()
    record(user, "lobby.welcome", instance, f"changed the lobby welcome text of {instance.name}", request)
    return settings_row


# --- the board ------------------------------------------------------------------------------------

@dataclass
class BoardSeat:
    label: str
    state: str
    page_open: bool
    url: str
    bot: dict | None = None  # a bot of the room's bot run holds this seat: {run, status, page, index}


@dataclass
class BoardRoom:
    ref: RoomRef
    gate_open: bool
    seats: list[BoardSeat]
    counts: dict[str, int]
    url: str
    bot_run: int | None = None  # number of the room's bot run that has not ended


def board_room(ref: RoomRef) -> BoardRoom:
    """The room's seats (participant labels, or the seats opened so far) with their state.
    Waiting seats whose page has had no live socket for PRESENCE_TTL go offline here (a
    manager killed without closing its sockets)."""
    room = ref.row
    room.refresh_from_db(fields=["gate_open"])
    rows = {s.label: s.state for s in room.seats.all()}
    labels = ref.labels or sorted(rows)
    pages = _open_pages(room.pk, labels)
    stale = [lab for lab in labels if rows.get(lab) == State.WAITING and not pages[lab]]
    if stale:
        room.seats.filter(label__in=stale, state=State.WAITING).update(state=State.OFFLINE, changed_at=timezone.now())
        for lab in stale:
            rows[lab] = State.OFFLINE
    bots = held_seats(room)
    seats = [BoardSeat(lab, rows.get(lab, State.OFFLINE), pages[lab], lobby_url(ref.instance.name, ref.name, lab),
                       bots.get(lab)) for lab in labels]
    counts = {s.value: 0 for s in State}
    counts["bot"] = 0
    for seat in seats:
        counts["bot" if seat.bot else seat.state] += 1
    return BoardRoom(ref, room.gate_open, seats, counts, lobby_url(ref.instance.name, ref.name),
                     next(iter(bots.values()))["run"] if bots else None)


def board(instance: Instance) -> list[BoardRoom]:
    rooms, language = live_rooms(instance)
    return [board_room(room_ref(instance, room, language)) for room in rooms]
