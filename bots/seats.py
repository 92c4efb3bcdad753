"""Bots in the empty seats of a lobby room.

The experimenter fills a room from its seat board: the ready humans (and those already in
the room) keep their seats, bots take seats that are offline (no kiosk open). The run is an
ordinary BotRun with `room` and `seat_labels` set; its worker (bots.engine) then

1. creates the oTree session IN the room (`POST /api/sessions` with `room_name`; found again
   after a crash by the run's session label, as for every run);
2. opens the room's lobby gate (lobby.services.set_gate), so the ready humans enter now;
3. sends each bot through the room like a human: `GET /room/<room>/?participant_label=
   <label>&welcome_page_ok=1`, following oTree's redirects into the participant it assigns
   on arrival; the participant's code and id_in_session are recorded on the Bot.

The rules (who may, which seats, what the session needs) are checked here before anything
is recorded, each with a message that says what to do.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from django.core.exceptions import ValidationError
from django.db import transaction

from bots import services
from bots.models import Bot, BotRun
from instances import otree_api, sleep
from lobby import services as lobby
from lobby.models import Seat
from manager.accounts.services import NotAllowed
from manager.audit.services import record

State = Seat.State
PARTICIPANT_PATH = re.compile(r"^/p/([A-Za-z0-9]{1,40})/")
HUMAN_STATES = (State.READY, State.ENTERED)  # ready behind the gate, or already sent to the room


# --- which seats -----------------------------------------------------------------------------

def room_run(room) -> BotRun | None:
    """The room's bot run that has not ended (at most one: `fill` refuses a second)."""
    return BotRun.objects.filter(room=room, status__in=BotRun.NOT_ENDED).order_by("-pk").first()


def bot_seats(room) -> dict[str, dict]:
    """label -> {run number, url, status, page} for the seats the room's current bot run holds."""
    run = room_run(room)
    if run is None:
        return {}
    bots = {b.label: b for b in run.bots.all()}
    found = {}
    for label in run.seat_labels or []:
        bot = bots.get(label)
        found[label] = {"run": run.number, "status": bot.get_status_display() if bot else run.get_status_display(),
                        "page": bot.page if bot else "", "index": bot.index if bot else None}
    return found


def plan(ref: lobby.RoomRef) -> dict:
    """The room as a fill would use it: humans (ready or entered) and offline seats."""
    seats = lobby.board_room(ref).seats  # (also turns stale "waiting" seats offline)
    return {"humans": [s.label for s in seats if s.state in HUMAN_STATES],
            "offline": [s.label for s in seats if s.state == State.OFFLINE],
            "waiting": [s.label for s in seats if s.state == State.WAITING]}


def _otree_room(instance, room: str) -> dict:
    """The room as the running app knows it ({name, session_code, url}); ValidationError
    when the app does not run or has no such room."""
    sleep.wake_quietly(instance.name, f"the lobby of room {room} (filled with bots)")
    try:
        rooms = otree_api.get_json(instance, "/api/rooms", total=20)
    except otree_api.OTreeUnavailable as exc:
        raise ValidationError(f"The oTree app is not running or does not answer ({exc}): start the instance "
                              "(or deploy it) and try again.") from None
    for item in rooms if isinstance(rooms, list) else []:
        if isinstance(item, dict) and item.get("name") == room:
            return item
    raise ValidationError(f"The running oTree app has no room “{room}”: deploy the release with this room first.")


# --- filling ------------------------------------------------------------------------------------

def fill(actor, ref: lobby.RoomRef, *, session_config: str, num_participants: int, provider, model: str,
         temperature: float = 1.0, memory: str = BotRun.Memory.SUMMARY, instructions: str = "",
         budget_usd: float | None = None, time_limit_minutes: int = 60, request=None) -> BotRun:
    """Record a bot run for the room's empty seats (queued; its worker creates the session
    in the room, opens the gate and lets the bots in). ValidationError saying why not."""
    instance = ref.instance
    if not lobby.can_manage(actor, instance):
        raise NotAllowed("Only the instance's owner and lab managers may fill its seats with bots.")
    if not ref.has_labels:
        raise ValidationError(f"Room “{ref.name}” has no participant label file: bots need participant labels "
                              "to take seats (add participant_label_file to the room in settings.py).")
    running = room_run(ref.row)
    if running is not None:
        raise ValidationError(f"Bot run #{running.number} is still playing in room “{ref.name}”: stop it or let "
                              "it finish first.")
    seats = plan(ref)
    humans, offline = seats["humans"], seats["offline"]
    if not humans and not offline:
        raise ValidationError("No participant is ready and no seat is offline: nobody to play with and no seat "
                              "for a bot.")
    if not humans:
        raise ValidationError("No participant is ready: hold the gate, let the participants click “I am ready”, "
                              "then fill the empty seats.")
    if not isinstance(num_participants, int) or isinstance(num_participants, bool) or num_participants < 1:
        raise ValidationError({"num_participants": ["must be a whole number of at least 1"]})
    if len(humans) > num_participants:
        raise ValidationError({"num_participants": [
            f"{len(humans)} participants are ready or in the room, more than the session's {num_participants} "
            "seats: choose a larger session (or reset seats)"]})
    needed = num_participants - len(humans)
    if needed == 0:
        raise ValidationError({"num_participants": [
            f"the {len(humans)} ready participants fill the session: no seat is left for bots (open the gate "
            "instead)"]})
    if needed > len(offline):
        raise ValidationError({"num_participants": [
            f"the session needs {needed} bots but only {len(offline)} seats are offline "
            f"({len(seats['waiting'])} seats have a kiosk open without being ready)"]})
    labels = offline[:needed]
    unknown = [label for label in labels + humans if label not in ref.labels]
    if unknown:  # the release changed meanwhile
        raise ValidationError(f"The room's label file does not contain {', '.join(unknown[:5])}: deploy again "
                              "or reset the seats.")
    if budget_usd is not None and (not isinstance(budget_usd, (int, float)) or budget_usd <= 0):
        raise ValidationError({"budget_usd": ["must be a positive amount in USD (or empty: no budget)"]})
    in_app = _otree_room(instance, ref.name)
    if in_app.get("session_code"):
        raise ValidationError(f"oTree's room “{ref.name}” already has session {in_app['session_code']}: close the "
                              "room in oTree's admin (Rooms → the room → close) before a new session starts there.")
    with transaction.atomic():  # the worker is enqueued when this commits: it sees the room fields
        run = services.create_run(actor, instance, session_config=session_config, num_participants=num_participants,
                                  num_bots=needed, provider=provider, model=model, temperature=temperature,
                                  instructions=instructions, memory=memory, time_limit_minutes=time_limit_minutes,
                                  request=request)
        services.set_run(run, room=ref.row, seat_labels=labels, budget_usd=budget_usd,
                         human_seats=[{"label": label, "code": "", "id_in_session": None} for label in humans])
        record(actor, "lobby.bots", instance,
               f"filled {needed} empty seats of room {ref.name} of {instance.name} with bots (bot run "
               f"#{run.number}; {len(humans)} humans)", request, room=ref.name)
    transaction.on_commit(lambda: lobby.push_board(ref.row))
    return run


# --- what the engine calls ----------------------------------------------------------------------

def room_name(run: BotRun) -> str | None:
    """The name of the run's lobby room (None: the room was removed)."""
    return BotRun.objects.filter(pk=run.pk).values_list("room__name", flat=True).first()


def entry_path(room: str, label: str) -> str:
    """The room URL a bot opens (the lobby's room_url, at the app's own address)."""
    return f"/room/{quote(room, safe='')}/?participant_label={quote(label, safe='')}&welcome_page_ok=1"


def participant_code(path: str) -> str:
    """The participant code in a participant page's path (/p/<code>/…), or ""."""
    found = PARTICIPANT_PATH.match(path or "")
    return found.group(1) if found else ""


def save_room_session(run: BotRun, code: str) -> None:
    """The session exists: one Bot per seat label (participants are assigned on arrival)."""
    with transaction.atomic():
        for index, label in enumerate(run.seat_labels or [], start=1):
            Bot.objects.get_or_create(run=run, index=index, defaults={"participant_code": "", "id_in_session": 0,
                                                                      "label": label})
        services.set_run(run, session_code=code)


def open_gate(run: BotRun) -> None:
    """The session is in the room: the ready humans go in now (the lobby's own gate action;
    opening an open gate again is harmless, so a resumed run does it again)."""
    from lobby.models import LobbyRoom

    room = LobbyRoom.objects.select_related("instance").filter(pk=run.room_id).first()
    if room is None:
        return
    ref = lobby.room_ref(room.instance, {"name": room.name}, "")
    actor = run.created_by if run.created_by and lobby.can_manage(run.created_by, room.instance) else None
    lobby.set_gate(actor or room.instance.owner, ref, True)


def arrived(run: BotRun, bot: Bot | None, code: str, participants: list[dict]) -> None:
    """A bot is in (`bot`, with its participant `code`), or the run ends (`bot` None): record
    the participants oTree gave the bot and, by their labels, the humans who arrived."""
    if bot is not None:
        found = next((p for p in participants if p.get("code") == code), {})
        bot.participant_code = code
        bot.id_in_session = int(found.get("id_in_session") or 0)
        Bot.objects.filter(pk=bot.pk).update(participant_code=code, id_in_session=bot.id_in_session)
    by_label = {p.get("label"): p for p in participants if p.get("label")}
    humans = []
    for seat in BotRun.objects.get(pk=run.pk).human_seats:
        p = by_label.get(seat.get("label"), {})
        humans.append({"label": seat.get("label"), "code": str(p.get("code") or seat.get("code") or ""),
                       "id_in_session": p.get("id_in_session") or seat.get("id_in_session")})
    services.set_run(run, human_seats=humans)


def push_board(run: BotRun) -> None:
    from lobby.models import LobbyRoom

    room = LobbyRoom.objects.select_related("instance").filter(pk=run.room_id).first()
    if room is not None:
        lobby.push_board(room)
