"""Lobby pages. Public (lab computers have no login): the room and seat list and the kiosk
seat page. Owner and lab managers: the board's room partial, gate, reset, welcome text and
the launchers download. Views are thin; lobby.services holds the rules."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import FileResponse, Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_GET, require_POST, require_http_methods

from instances.selectors import get_visible_instance
from lobby import launchers, services
from lobby import texts as catalogue
from manager.accounts.services import NotAllowed
from manager.throttle import refused_page


def _not_found(request, exc: services.LobbyNotFound):
    t = catalogue.texts(exc.language)
    return render(request, "lobby/404.html", {"message": str(exc), "t": t, "lang": catalogue.language(exc.language)},
                  status=404)


def _kiosk_page(request, template, context, language):
    context.update(t=catalogue.texts(language), lang=catalogue.language(language))
    response = render(request, template, context)
    add_never_cache_headers(response)  # a reload always shows the current state
    return response


# --- public kiosk pages -------------------------------------------------------------------------

@require_GET
def lobby_index(request, instance):
    try:
        found, rooms, language = services.find_instance(instance)
    except services.LobbyNotFound as exc:
        return _not_found(request, exc)
    refs = [services.room_ref(found, room, language) for room in rooms]
    return _kiosk_page(request, "lobby/index.html", {"instance": found, "rooms": refs}, language)


@require_GET
def lobby_room(request, instance, room):
    """A room's seats, or (a room without participant labels) the seat picker; the picker
    form sends `?seat=<name>` here and is redirected to that seat's page."""
    try:
        ref = services.find_room(instance, room)
    except services.LobbyNotFound as exc:
        return _not_found(request, exc)
    error = ""
    seat = request.GET.get("seat")
    if seat is not None and not ref.has_labels:
        seat = seat.strip()
        try:
            services.check_label(ref, seat)
            return redirect(services.lobby_path(instance, ref.name, seat))
        except services.LobbyNotFound as exc:
            error = str(exc)
    return _kiosk_page(request, "lobby/room.html", {"instance": ref.instance, "room": ref, "error": error,
                                                   "seat": seat or ""}, ref.language)


@require_http_methods(["GET", "POST"])
def lobby_seat(request, instance, room, label):
    """GET: the kiosk page. POST ("I am ready", CSRF-checked): the seat is ready; with the
    gate open the browser goes to the oTree room (a redirect, or JSON for the page's script)."""
    try:
        ref = services.find_seat(instance, room, label)
    except services.LobbyNotFound as exc:
        return _not_found(request, exc)
    if request.method == "POST":
        state, url = services.mark_ready(ref, label)
        if "application/json" in request.headers.get("Accept", ""):
            return JsonResponse({"state": state, "url": url})
        return redirect(url or services.lobby_path(instance, ref.name, label))
    services.wake_for(ref)
    snapshot = services.kiosk_snapshot(ref.row, label)
    context = {"instance": ref.instance, "room": ref, "label": label, "state": snapshot["seat"],
               "welcome": services.welcome_text(ref.instance, ref.language),
               "ws_path": services.lobby_path(ref.instance.name, ref.name).replace("/lobby/", "/ws/lobby/", 1),
               "action": request.path}
    return _kiosk_page(request, "lobby/seat.html", context, ref.language)


# --- the experimenter's board (owner, lab managers) ------------------------------------------------

def _board_ref(request, name, room) -> services.RoomRef:
    instance = get_visible_instance(request.user, name)  # 404 for everyone else
    try:
        return services.find_room(instance.name, room)
    except services.LobbyNotFound as exc:
        raise Http404(str(exc)) from None


def _render_room(request, ref):
    """The content of one room's board (its wrapper on the instance page stays)."""
    return render(request, "lobby/_room_board_inner.html", {"instance": ref.instance, "room": services.board_room(ref)})


def _room_response(request, ref):
    """htmx: the room's board, fresh; a plain form post: back to the instance page."""
    if request.headers.get("HX-Request"):
        return _render_room(request, ref)
    return redirect(reverse("instance_detail", args=[ref.instance.name]) + "#lobby")


@login_required
@require_GET
def board_room(request, name, room):
    return _render_room(request, _board_ref(request, name, room))


@login_required
@require_POST
def gate(request, name, room):
    ref = _board_ref(request, name, room)
    action = request.POST.get("gate")
    if action not in ("open", "hold"):
        return HttpResponse("gate must be “open” or “hold”.", status=422, content_type="text/plain; charset=utf-8")
    services.set_gate(request.user, ref, action == "open", request=request)
    return _room_response(request, ref)


@login_required
@require_POST
def reset(request, name, room):
    ref = _board_ref(request, name, room)
    label = request.POST.get("label")
    try:
        services.reset(request.user, ref, label=label or None, request=request)
    except services.LobbyNotFound as exc:
        raise Http404(str(exc)) from None
    return _room_response(request, ref)


@login_required
@require_POST
def welcome(request, name):
    instance = get_visible_instance(request.user, name)
    try:
        services.set_welcome_text(request.user, instance, request.POST.get("welcome_text", ""), request=request)
        messages.success(request, "Lobby welcome text saved; kiosk pages show it when they are next loaded.")
    except (ValidationError, NotAllowed) as exc:
        messages.error(request, " ".join(getattr(exc, "messages", [str(exc)])))
    return redirect(reverse("instance_detail", args=[instance.name]) + "#lobby")


@login_required
@require_GET
def launchers_zip(request, name):
    instance = get_visible_instance(request.user, name)
    rooms, _ = services.live_rooms(instance)
    if not rooms:
        raise Http404("This instance has no rooms yet: deploy a project with ROOMS first.")
    data = [(r["name"], [str(x) for x in r.get("participant_labels") or []],
             services.lobby_url(instance.name, r["name"])) for r in rooms]
    try:
        body = launchers.launchers_zip(instance.name, data)
    except launchers.UnsafeArgument as exc:
        return HttpResponse(f"Cannot make launchers: {exc}", status=409, content_type="text/plain; charset=utf-8")
    # Streamed from its spooled file (closed when sent).
    return FileResponse(body, as_attachment=True, filename=f"{instance.name}-kiosk-launchers.zip",
                        content_type="application/zip")


@login_required
@require_http_methods(["GET", "POST"])
def fill_with_bots(request, name, room):
    """GET: the room's humans and offline seats, and the form; POST (CSRF): fill the empty
    seats with bots (bots.seats.fill), then the run's page."""
    from bots import seats
    from bots import services as bot_services
    from lobby.forms import FillWithBotsForm

    ref = _board_ref(request, name, room)
    plan = seats.plan(ref)
    form = FillWithBotsForm(request.POST or None, ref=ref, seats=plan)
    if request.method == "POST" and form.is_valid():
        data = dict(form.cleaned_data)
        choice = data.pop("model")

        def start():
            provider, model = bot_services.resolve_model(choice)
            return seats.fill(request.user, ref, provider=provider, model=model, request=request, **data)

        run = form.run(start)
        if run is not None:
            messages.success(request, f"Bot run #{run.number}: {run.num_bots} bots take seats "
                                      f"{', '.join(run.seat_labels)} of room {ref.name}; the session is created in "
                                      "the room, then the gate opens and everybody enters.")
            return redirect("bot_run", name=ref.instance.name, number=run.number)
        plan = seats.plan(ref)
    response = render(request, "lobby/bots.html", {"instance": ref.instance, "room": ref, "plan": plan, "form": form,
                                                   "running": seats.room_run(ref.row)},
                      status=422 if form.is_bound and form.errors else 200)
    return refused_page(response, form.throttled) if form.throttled else response
