"""The results downloads of a bot run and of a bot experiment (bots/results.py): the
instance's owner and lab managers; others get 404."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from bots import experiments, preflight, results, services
from instances.selectors import get_visible_instance
from manager.throttle import Throttled


def results_response(found: results.Results, kind: str) -> HttpResponse:
    """One of the results downloads as an attachment (shared with the JSON API); a table too
    large is 409 with the reason."""
    content, content_type, filename = results.render(found, kind)
    response = HttpResponse(content, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


def _too_large(exc: Exception) -> HttpResponse:
    return HttpResponse(str(exc), status=409, content_type="text/plain; charset=utf-8")


@login_required
def run_results(request, name, number, kind):
    run = services.get_run(request.user, name, number)
    try:
        return results_response(results.for_run(run), kind)
    except results.ResultsRefused as exc:
        return _too_large(exc)


@login_required
def experiment_results(request, name, number, kind):
    experiment = experiments.get_experiment(request.user, name, number)
    try:
        return results_response(results.for_experiment(experiment), kind)
    except results.ResultsRefused as exc:
        return _too_large(exc)


@login_required
@require_POST
def preflight_start(request, name):
    """"Preflight" beside "Start bot run": the same form's session config and participants."""
    instance = get_visible_instance(request.user, name)
    try:
        number = int(request.POST.get("num_participants", ""))
    except ValueError:
        number = 0
    try:
        run = preflight.start(request.user, instance, session_config=request.POST.get("session_config", ""),
                              num_participants=number, request=request)
    except ValidationError as exc:
        parts = ([f"{field}: {' '.join(m)}" for field, m in exc.message_dict.items()] if hasattr(exc, "error_dict")
                 else exc.messages)
        messages.error(request, "Preflight not started: " + " ".join(parts))
        return redirect("bot_runs", name=instance.name)
    except Throttled as exc:
        messages.error(request, str(exc))
        return redirect("bot_runs", name=instance.name)
    messages.success(request, f"Preflight #{run.number} is starting: random bots play every page of "
                              f"{run.session_config}; the report below fills in as they go.")
    return redirect("bot_run", name=instance.name, number=run.number)
