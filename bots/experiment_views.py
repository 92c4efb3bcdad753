"""Pages of bot experiments: the list and the design form, an experiment's progress (live),
Stop and Run again. Rules live in bots.experiments."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from bots import experiments, services
from bots.forms import BotExperimentForm
from bots.models import RANDOM_POLICY
from instances.selectors import get_visible_instance
from manager.throttle import refused_page


def design_from_form(data: dict) -> dict:
    """The form's lists (model choices, "0, 0.7", "name: text" per line) as a design."""
    errors: dict[str, list[str]] = {}
    models = []
    for choice in data["models"]:
        try:
            provider, model = services.resolve_model(choice)
        except ValidationError as exc:
            errors.setdefault("models", []).extend(m for ms in exc.message_dict.values() for m in ms)
            continue
        models.append({"provider": provider.name, "model": model} if provider else {"model": RANDOM_POLICY})
    temperatures = []
    for part in data["temperatures"].replace(";", ",").split(","):
        if not part.strip():
            continue
        try:
            temperatures.append(float(part))
        except ValueError:
            errors.setdefault("temperatures", []).append(f"{part.strip()!r} is not a number")
    variants = []
    for number, line in enumerate((data.get("instructions") or "").splitlines(), start=1):
        if not line.strip():
            continue
        name, colon, text = line.partition(":")
        if not colon:
            errors.setdefault("instructions", []).append(f"line {number}: write name: instructions")
            continue
        variants.append({"name": name.strip(), "text": text.strip()})
    if errors:
        raise ValidationError(errors)
    design = {key: data[key] for key in ("title", "session_config", "num_participants", "num_bots", "repetitions",
                                         "max_parallel", "rate_limit", "concurrency", "time_limit_minutes",
                                         "budget_usd", "run_budget_usd", "use_cache")}
    design.update(models=models, temperatures=temperatures, memory=list(data["memory"]))
    if variants:
        design["instructions"] = variants
    return design


@login_required
def experiment_list(request, name):
    instance = get_visible_instance(request.user, name)
    form = BotExperimentForm(request.POST or None, instance=instance)
    if request.method == "POST" and form.is_valid():
        experiment = form.run(lambda: experiments.create_experiment(
            request.user, instance, design_from_form(form.cleaned_data), request=request))
        if experiment is not None:
            messages.success(request, f"Bot experiment #{experiment.number}: {experiment.runs.count()} runs, "
                                      f"{experiment.max_parallel} at a time.")
            return redirect("bot_experiment", name=instance.name, number=experiment.number)
    rows = [(e, experiments.progress(e)) for e in instance.bot_experiments.select_related("created_by")[:30]]
    response = render(request, "bots/experiments.html", {"instance": instance, "form": form, "rows": rows},
                      status=422 if form.is_bound and form.errors else 200)
    return refused_page(response, form.throttled) if form.throttled else response


@login_required
def experiment_detail(request, name, number):
    experiment = experiments.get_experiment(request.user, name, number)
    progress = experiments.progress(experiment)
    return render(request, "bots/experiment.html", {
        "instance": experiment.instance, "experiment": experiment, "progress": progress,
        "time_left": experiments.time_left_text(progress["seconds_left"]),
        "runs": experiment.runs.order_by("number")})


@login_required
@require_POST
def experiment_stop(request, name, number):
    experiment = experiments.get_experiment(request.user, name, number)
    if experiment.is_active:
        experiments.stop_experiment(request.user, experiment, request=request)
        messages.info(request, f"Stopping bot experiment #{number}: no further run starts; playing runs stop at "
                               "their next safe point.")
    else:
        messages.info(request, f"Bot experiment #{number} has already ended ({experiment.status}).")
    return redirect("bot_experiment", name=name, number=number)


@login_required
@require_POST
def experiment_rerun(request, name, number):
    experiment = experiments.get_experiment(request.user, name, number)
    form = BotExperimentForm(instance=experiment.instance)  # only to show the service's refusal
    again = form.run(experiments.rerun_experiment, request.user, experiment, request=request)
    if again is None:
        messages.error(request, "Run again was refused: " + " ".join(
            f"{k}: {' '.join(v)}" if k != "__all__" else " ".join(v) for k, v in form.errors.items()))
        return redirect("bot_experiment", name=name, number=number)
    messages.success(request, f"Bot experiment #{again.number} repeats #{number} (the same design and seeds).")
    return redirect("bot_experiment", name=name, number=again.number)
