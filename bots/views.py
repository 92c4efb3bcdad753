import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from bots import budget, exports, manifest, preflight, services
from bots.live import bots_of, run_event
from bots.forms import BotRunForm, ProviderForm
from bots.models import RANDOM_POLICY, BotRun, Provider
from instances.selectors import get_visible_instance
from manager.access import superuser_required
from manager.throttle import Throttled, refused_page


@login_required
def run_list(request, name):
    """The instance's bot runs, and the form that starts a new one (POST)."""
    instance = get_visible_instance(request.user, name)
    form = BotRunForm(request.POST or None, instance=instance)
    if request.method == "POST" and form.is_valid():
        data = dict(form.cleaned_data)
        choice = data.pop("model")

        def start():
            provider, model = services.resolve_model(choice)
            return services.create_run(request.user, instance, provider=provider, model=model, request=request,
                                       **data)

        run = form.run(start)
        if run is not None:
            messages.success(request, f"Bot run #{run.number} is starting: the oTree session is created, then "
                                      "the bots play.")
            return redirect("bot_run", name=instance.name, number=run.number)
    runs = instance.bot_runs.select_related("created_by").all()[:50]
    cap = budget.monthly_cap(request.user)
    response = render(request, "bots/runs.html", {"instance": instance, "form": form, "runs": runs,
                                                  "has_providers": Provider.objects.filter(enabled=True).exists(),
                                                  "month_spent": budget.month_spent(request.user.pk),
                                                  "month_cap": cap},
                      status=422 if form.is_bound and form.errors else 200)
    return refused_page(response, form.throttled) if form.throttled else response


@login_required
def run_detail(request, name, number):
    run = services.get_run(request.user, name, number)
    bots = bots_of(run)
    public = run.instance.url
    humans = [{**seat, "url": f"{public}InitializeParticipant/{seat['code']}" if public and seat.get("code") else ""}
              for seat in run.human_seats]
    return render(request, "bots/run.html", {
        "instance": run.instance, "run": run, "bots": bots, "humans": humans, "random_policy": RANDOM_POLICY,
        "monitor_url": f"{public}SessionMonitor/{run.session_code}" if public and run.session_code else "",
        "room": run.room.name if run.room_id else "", "event": run_event(run, bots, bots),
        "preflight": preflight.report(run) if run.purpose == BotRun.Purpose.PREFLIGHT else None})


@login_required
@require_POST
def run_stop(request, name, number):
    run = services.get_run(request.user, name, number)
    if run.is_active:
        services.stop_run(request.user, run, request=request)
        messages.info(request, f"Stopping bot run #{run.number}: every bot stops at its next safe point.")
    else:
        messages.info(request, f"Bot run #{run.number} has already ended ({run.status}).")
    return redirect("bot_run", name=name, number=number)


@login_required
@require_POST
def run_rerun(request, name, number):
    """Run again: a new run with this run's manifest (parameters, seed, model, budget)."""
    run = services.get_run(request.user, name, number)
    try:
        new = services.rerun(request.user, run, use_cache=bool(request.POST.get("use_cache")), request=request)
    except ValidationError as exc:
        messages.error(request, f"Bot run #{run.number} cannot run again: " + "; ".join(exc.messages))
        return redirect("bot_run", name=name, number=number)
    except Throttled as exc:
        messages.error(request, str(exc))
        return redirect("bot_run", name=name, number=number)
    messages.success(request, f"Bot run #{new.number} runs #{run.number} again"
                              + (" from the replay cache where it can." if new.use_cache else "."))
    return redirect("bot_run", name=name, number=new.number)


DOWNLOADS = {
    "responses.csv": ("text/csv; charset=utf-8", lambda run: exports.responses_csv(run)),
    "conversations.json": ("application/json", lambda run: json.dumps(exports.conversations(run), indent=1)),
    "summary.json": ("application/json", lambda run: json.dumps(exports.summary(run), indent=1)),
    "manifest.json": ("application/json", lambda run: json.dumps(manifest.for_export(run), indent=1)),
}


def download(run, kind: str) -> HttpResponse:
    """One of the run's downloads as an attachment (shared with the JSON API)."""
    if kind not in DOWNLOADS:
        raise Http404("No such download: " + ", ".join(DOWNLOADS) + ".")
    content_type, make = DOWNLOADS[kind]
    response = HttpResponse(make(run), content_type=content_type)
    stem, _, ext = kind.partition(".")
    response["Content-Disposition"] = f'attachment; filename="{run.instance.name}-bot-run-{run.number}-{stem}.{ext}"'
    return response


@login_required
def run_download(request, name, number, kind):
    return download(services.get_run(request.user, name, number), kind)


@superuser_required
def provider_list(request):
    form = ProviderForm(request.POST or None, initial={"enabled": True})
    if request.method == "POST" and form.is_valid():
        provider = form.run(services.save_provider, request.user, None, request=request, **_provider_values(form))
        if provider is not None:
            messages.success(request, f"Provider {provider.name} added; its API key is stored encrypted.")
            return redirect("bot_providers")
    return render(request, "bots/providers.html", {"providers": Provider.objects.all(), "form": form},
                  status=422 if form.is_bound and form.errors else 200)


@superuser_required
def provider_edit(request, provider_id):
    provider = get_object_or_404(Provider, pk=provider_id)
    form = ProviderForm(request.POST or None, initial={
        "name": provider.name, "base_url": provider.base_url, "models": services.models_text(provider),
        "response_format": provider.response_format, "timeout_seconds": provider.timeout_seconds,
        "requests_per_minute": provider.requests_per_minute, "enabled": provider.enabled})
    if request.method == "POST" and form.is_valid():
        if form.run(services.save_provider, request.user, provider, request=request,
                    **_provider_values(form)) is not None:
            messages.success(request, f"Provider {provider.name} saved.")
            return redirect("bot_providers")
    return render(request, "bots/provider.html", {"provider": provider, "form": form},
                  status=422 if form.is_bound and form.errors else 200)


@superuser_required
@require_POST
def provider_delete(request, provider_id):
    provider = get_object_or_404(Provider, pk=provider_id)
    services.delete_provider(request.user, provider, request=request)
    messages.info(request, f"Provider {provider.name} deleted; runs that used it keep their data.")
    return redirect("bot_providers")


def _provider_values(form) -> dict:
    data = form.cleaned_data
    return {"name": data["name"], "base_url": data["base_url"], "api_key": data["api_key"] or None,
            "models": data["models"], "response_format": data["response_format"],
            "timeout_seconds": data["timeout_seconds"], "requests_per_minute": data["requests_per_minute"],
            "enabled": data["enabled"]}

