"""/api/v1/instances/{name}/bot-experiments: designs of bot runs (bots.experiments), with the
same access rules as the pages (the instance's owner and lab managers; others get 404).
`{number}` is the experiment's number within the instance (as bot runs use theirs)."""

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from ninja import Path, Router, Schema, Status
from pydantic import Field

from bots import experiments, services
from bots.models import RANDOM_POLICY, BotExperiment, BotRun
from instances.selectors import get_visible_instance
from manager.api.errors import responses
from manager.api.schemas import MAX_ID, InputSchema, Whole, rules, text

router = Router(tags=["bot experiments"])


def _limits(key: str) -> dict:
    low, high = services.LIMITS[key]
    return rules(minimum=low, maximum=high)


class ModelIn(InputSchema):
    provider: str | None = Field(None, description=f'provider name; omit for "{RANDOM_POLICY}"',
                                 **text(max_length=60, single_line=True))
    model: str = Field(description=f'a model the provider offers, or "{RANDOM_POLICY}"',
                       **text(max_length=100, single_line=True))


class VariantIn(InputSchema):
    name: str = Field(description="a short name (recorded as the run's `instructions` factor)",
                      **text(max_length=experiments.VARIANT_NAME_LENGTH, single_line=True))
    text: str = Field("", description="extra instructions for the bots", **text(max_length=services.MAX_INSTRUCTIONS))


class BotExperimentIn(InputSchema):
    title: str = Field("", **text(max_length=200, single_line=True))
    session_config: str = Field(description="a session config of the live release",
                                **text(max_length=100, single_line=True))
    num_participants: Whole = Field(description="participants of each run's oTree session",
                                    **_limits("num_participants"))
    num_bots: Whole = Field(description="how many of them are bots", **_limits("num_bots"))
    models: list[ModelIn] = Field(description="one or more models, any providers (each once)",
                                  **rules(min_items=1, max_items=experiments.MAX_LIST))
    temperatures: list[float] = Field([1.0], description="one run per temperature (and per other factor)",
                                      **rules(min_items=1, max_items=experiments.MAX_LIST, unique_items=True,
                                              items={"type": "number", "minimum": services.TEMPERATURE_RANGE[0],
                                                     "maximum": services.TEMPERATURE_RANGE[1]}))
    instructions: list[VariantIn] = Field(default_factory=lambda: [VariantIn(name="default", text="")],
                                          description="instruction variants: one run per variant (and per other "
                                          "factor); names used once",
                                          **rules(min_items=1, max_items=experiments.MAX_LIST))
    memory: list[str] = Field([BotRun.Memory.SUMMARY.value], description='memory modes: "summary", "history"',
                              **rules(min_items=1, unique_items=True,
                                      items={"type": "string", "enum": BotRun.Memory.values}))
    repetitions: Whole = Field(1, description="runs of every combination", **rules(minimum=1, maximum=100))
    max_parallel: Whole = Field(2, description="runs playing at once (at most LAB_BOT_RUNS)",
                                **rules(minimum=1, maximum=settings.LAB_BOT_RUNS))
    rate_limit: Whole = Field(60, description="model requests per minute of each run", **_limits("rate_limit"))
    concurrency: Whole = Field(10, description="model requests in flight at once, each run", **_limits("concurrency"))
    time_limit_minutes: Whole = Field(60, description="each run stops after this many minutes",
                                      **_limits("time_limit_minutes"))
    budget_usd: float | None = Field(None, description="cap of the whole experiment in USD (none: no cap)",
                                     **rules(exclusive_minimum=0, maximum=services.MAX_BUDGET))
    run_budget_usd: float | None = Field(None, description="cap of each run in USD (none: no cap)",
                                         **rules(exclusive_minimum=0, maximum=services.MAX_BUDGET))
    use_cache: bool = Field(False, description="the replay cache for every run")


class ProgressOut(Schema):
    runs: int
    waiting: int
    running: int = Field(description="queued, starting, running or stopping")
    finished: int
    stopped: int
    failed: int
    tokens: int
    cost_usd: float
    seconds_left: int | None = Field(description="estimated from the finished runs' mean duration (null before "
                                     "the first one ends)")


class ExperimentRunOut(Schema):
    id: int = Field(description="the run's number (GET .../bot-runs/{id})")
    status: str
    status_reason: str
    factors: dict
    seed: int | None


class BotExperimentOut(Schema):
    id: int = Field(description="the experiment's number within the instance")
    title: str
    status: str = Field(**rules(enum=BotExperiment.Status.values))
    status_reason: str
    design: dict
    source: int | None = Field(description="the experiment this one repeats")
    created_by: str | None
    created_at: str
    finished_at: str | None
    progress: ProgressOut
    runs: list[ExperimentRunOut]


def serialize(experiment: BotExperiment) -> dict:
    return {
        "id": experiment.number, "title": experiment.title, "status": experiment.status,
        "status_reason": experiment.status_reason, "design": experiment.design,
        "source": experiment.source.number if experiment.source_id and experiment.source else None,
        "created_by": experiment.created_by.username if experiment.created_by else None,
        "created_at": experiment.created_at.isoformat(),
        "finished_at": experiment.finished_at.isoformat() if experiment.finished_at else None,
        "progress": experiments.progress(experiment),
        "runs": [{"id": r.number, "status": r.status, "status_reason": r.status_reason, "factors": r.factors,
                  "seed": r.seed} for r in experiment.runs.order_by("number")],
    }


@router.get("/{name}/bot-experiments", summary="Bot experiments of an instance",
            response=responses({200: list[BotExperimentOut]}, 404))
def list_bot_experiments(request: HttpRequest, name: str):
    instance = get_visible_instance(request.auth, name)
    return [serialize(e) for e in instance.bot_experiments.select_related("instance", "created_by", "source")]


@router.post("/{name}/bot-experiments", summary="Start a bot experiment (a design of bot runs)",
             response=responses({201: BotExperimentOut}, 400, 403, 404, 422, 429))
def start_bot_experiment(request: HttpRequest, name: str, payload: BotExperimentIn, response: HttpResponse):
    """Expands the design into runs (models x temperatures x instruction variants x memory
    modes x repetitions, at most 500) and plays `max_parallel` of them at a time; follow it
    with `GET .../bot-experiments/{id}`."""
    instance = get_visible_instance(request.auth, name)
    design = payload.dict()
    design["models"] = [{k: v for k, v in m.items() if v is not None} for m in design["models"]]
    experiment = experiments.create_experiment(request.auth, instance, design, request=request)
    response["Location"] = f"/api/v1/instances/{name}/bot-experiments/{experiment.number}"
    return Status(201, serialize(experiment))


@router.get("/{name}/bot-experiments/{number}", summary="A bot experiment's progress and runs",
            response=responses({200: BotExperimentOut}, 404))
def get_bot_experiment(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    return serialize(experiments.get_experiment(request.auth, name, number))


@router.post("/{name}/bot-experiments/{number}/stop", summary="Stop a bot experiment",
             response=responses({202: BotExperimentOut}, 404))
def stop_bot_experiment(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    """No further run starts; waiting runs are stopped, playing ones stop at their next safe point."""
    experiment = experiments.get_experiment(request.auth, name, number)
    return Status(202, serialize(experiments.stop_experiment(request.auth, experiment, request=request)))


@router.post("/{name}/bot-experiments/{number}/rerun", summary="Run a bot experiment again",
             response=responses({201: BotExperimentOut}, 404, 422, 429))
def rerun_bot_experiment(request: HttpRequest, name: str, response: HttpResponse,
                         number: int = Path(..., ge=1, le=MAX_ID)):
    """A new experiment with the same design, factors and seeds per run."""
    experiment = experiments.get_experiment(request.auth, name, number)
    again = experiments.rerun_experiment(request.auth, experiment, request=request)
    response["Location"] = f"/api/v1/instances/{name}/bot-experiments/{again.number}"
    return Status(201, serialize(again))


# GET .../bot-experiments/{number}/results.csv: the analysis-ready results (bots.results; its own router)
