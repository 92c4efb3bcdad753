"""/api/v1/instances/{name}/bot-runs: LLM bot runs, with the same access rules as the
pages (the instance's owner and lab managers; others get 404). /api/v1/bot-providers:
the models a run may use (names only, never keys)."""

from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from ninja import Path, Router, Schema, Status
from pydantic import ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from bots import budget, preflight, services
from bots.live import bots_of, run_event
from bots.models import RANDOM_POLICY, BotRun, Provider
from bots.views import download
from instances.selectors import get_visible_instance
from manager.api.errors import responses
from manager.api.schemas import MAX_ID, InputSchema, Whole, column, rules, text

router = Router(tags=["bot runs"])
providers_router = Router(tags=["bot runs"])


def _limits(key: str) -> dict:
    low, high = services.LIMITS[key]
    return rules(minimum=low, maximum=high)


class BotRunIn(InputSchema):
    # `provider` is required unless `model` is "random" (the offline policy).
    model_config = ConfigDict(json_schema_extra={
        "if": {"not": {"properties": {"model": {"const": RANDOM_POLICY}}, "required": ["model"]}},
        "then": {"required": ["provider"], "properties": {"provider": {"type": "string"}}},
    })

    session_config: str = Field(description="a session config of the live release (422 when there is none)",
                                **text(max_length=column(BotRun, "session_config"), single_line=True))
    num_participants: Whole = Field(description="participants of the oTree session", **_limits("num_participants"))
    num_bots: Whole = Field(description="how many of them are bots (the first ones; at most `num_participants`); "
                          "the rest are human seats", **_limits("num_bots"))
    model: str = Field(description=f'a model of `provider`, or "{RANDOM_POLICY}" (the offline random policy)',
                       **text(max_length=column(BotRun, "model"), single_line=True))
    provider: str | None = Field(None, description="provider name (see GET /api/v1/bot-providers); required unless "
                                 f'`model` is "{RANDOM_POLICY}". An unknown or disabled provider, or a model it does '
                                 "not offer, is 422.",
                                 **text(max_length=column(Provider, "name"), single_line=True))
    temperature: float = Field(1.0, **rules(minimum=services.TEMPERATURE_RANGE[0],
                                            maximum=services.TEMPERATURE_RANGE[1]))
    instructions: str = Field("", description="extra instructions for the bots",
                              **text(max_length=services.MAX_INSTRUCTIONS))
    memory: str = Field(BotRun.Memory.SUMMARY.value, description='"summary" (running notes) or "history" '
                        "(the whole conversation)", **rules(enum=BotRun.Memory.values))
    rate_limit: Whole = Field(60, description="model requests per minute for the whole run", **_limits("rate_limit"))
    concurrency: Whole = Field(10, description="model requests in flight at once", **_limits("concurrency"))
    time_limit_minutes: Whole = Field(60, description="the run stops after this many minutes",
                                    **_limits("time_limit_minutes"))
    budget_usd: float | None = Field(None, description="the run stops when its model calls cost this much "
                                     "(USD; > 0; none: no cap of its own). A run is refused (422) while its "
                                     "starter's monthly bot budget is spent.",
                                     **rules(exclusive_minimum=0, maximum=services.MAX_BUDGET))
    seed: Whole | None = Field(None, description="sent to the provider as `seed` and recorded in the manifest",
                               **rules(minimum=0, maximum=services.MAX_SEED))
    use_cache: bool = Field(False, description="answer identical requests from the lab's replay cache (no cost) "
                            "and store new replies")


class RerunIn(InputSchema):
    use_cache: bool | None = Field(None, description="the replay cache for the new run (default: as the run had it)")


class BotOut(Schema):
    index: int
    participant: str
    status: str = Field(description="waiting, playing, wait_page, thinking, finished, gave_up, stopped")
    status_label: str
    reason: str
    app: str
    page: str
    round: int
    answers: int
    retries: int
    tokens: int
    cost: float


class BotRunOut(Schema):
    id: int = Field(description="the run's number within the instance")
    status: str = Field(description="queued, starting, running, stopping, finished, stopped, failed",
                        **rules(enum=BotRun.Status.values))
    status_reason: str
    session_config: str
    session_code: str
    num_participants: int
    num_bots: int
    provider: str | None
    model: str
    temperature: float
    memory: str
    instructions: str
    rate_limit: int
    concurrency: int
    time_limit_minutes: int
    created_by: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    monitor_url: str = Field(description="oTree's session monitor (needs the oTree admin login)")
    human_links: list[str] = Field(description="start links of the participants that are not bots")
    tokens: int
    estimated_cost: float = Field(description="USD, from the provider's prices")
    bots: list[BotOut]
    downloads: dict[str, str]
    purpose: str = Field(description='"play", or "preflight" (POST .../bot-preflight)')
    report: dict | None = Field(description="a preflight's report: pages met (fields), problems (kind, detail, page)")
    budget_usd: float | None = Field(description="the run's cap (USD)")
    spent_usd: float = Field(description="what its model calls cost (cached answers cost nothing)")
    use_cache: bool
    seed: int | None
    returned_model: str = Field(description="the model id the provider answered with (last seen)")
    system_fingerprint: str
    rerun_of: int | None = Field(description="the run this one runs again")


class ProviderOut(Schema):
    name: str
    base_url: str
    models: list[str]
    enabled: bool


def serialize(run: BotRun) -> dict:
    bots = bots_of(run)
    live = run_event(run, bots, bots)  # bots and totals as the run page shows them
    public = run.instance.url
    base = f"/api/v1/instances/{run.instance.name}/bot-runs/{run.number}"
    return {
        "id": run.number, "status": run.status, "status_reason": run.status_reason,
        "session_config": run.session_config, "session_code": run.session_code,
        "num_participants": run.num_participants, "num_bots": run.num_bots,
        "provider": run.provider_name or None, "model": run.model, "temperature": run.temperature,
        "memory": run.memory, "instructions": run.instructions, "rate_limit": run.rate_limit,
        "concurrency": run.concurrency, "time_limit_minutes": run.time_limit_minutes,
        "created_by": run.created_by.username if run.created_by else None, "created_at": run.created_at.isoformat(),
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "monitor_url": f"{public}SessionMonitor/{run.session_code}" if public and run.session_code else "",
        "human_links": [f"{public}InitializeParticipant/{s['code']}" for s in run.human_seats if s.get("code")]
        if public else [],
        "tokens": live["totals"]["tokens"], "estimated_cost": live["totals"]["cost"], "bots": live["bots"],
        "downloads": {kind: f"{base}/{kind}" for kind in ("responses.csv", "conversations.json", "summary.json",
                                                          "results.csv", "results.parquet", "manifests.json",
                                                          "results.zip", "manifest.json")},
        "purpose": run.purpose, "report": preflight.report(run) if run.purpose == BotRun.Purpose.PREFLIGHT else None,
        "budget_usd": run.budget_usd, "spent_usd": round(budget.run_spent(run), 6), "use_cache": run.use_cache,
        "seed": run.seed, "returned_model": run.returned_model, "system_fingerprint": run.system_fingerprint,
        "rerun_of": run.source.number if run.source_id and run.source else None,
    }


@router.get("/{name}/bot-runs", summary="Bot runs of an instance", response=responses({200: list[BotRunOut]}, 404))
def list_bot_runs(request: HttpRequest, name: str):
    instance = get_visible_instance(request.auth, name)
    return [serialize(r) for r in instance.bot_runs.select_related("instance", "created_by")]


@router.post("/{name}/bot-runs", summary="Start a bot run",
             response=responses({201: BotRunOut}, 400, 403, 404, 422, 429))
def start_bot_run(request: HttpRequest, name: str, payload: BotRunIn, response: HttpResponse):
    """Create the oTree session through the instance's REST API and let the bots play it
    (in the background: poll `GET .../bot-runs/{id}` or watch the run page)."""
    instance = get_visible_instance(request.auth, name)
    data = payload.dict()
    model, provider_name = data.pop("model"), data.pop("provider")
    if model == RANDOM_POLICY and not provider_name:
        provider, model = None, RANDOM_POLICY
    else:
        if not provider_name:
            raise ValidationError({"provider": [f'name the provider of the model (or use model "{RANDOM_POLICY}")']})
        provider, model = services.resolve_model(model, provider_name=provider_name)
    run = services.create_run(request.auth, instance, provider=provider, model=model, request=request, **data)
    response["Location"] = f"/api/v1/instances/{name}/bot-runs/{run.number}"
    return Status(201, serialize(run))


@router.get("/{name}/bot-runs/{number}", summary="One bot run with its bots", response=responses({200: BotRunOut}, 404))
def get_bot_run(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    return serialize(services.get_run(request.auth, name, number))


@router.post("/{name}/bot-runs/{number}/stop", summary="Stop all bots of a run", response=responses({202: BotRunOut}, 404))
def stop_bot_run(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    run = services.get_run(request.auth, name, number)
    services.stop_run(request.auth, run, request=request)
    return Status(202, serialize(run))


@router.post("/{name}/bot-runs/{number}/rerun", summary="Run a bot run again",
             response=responses({201: BotRunOut}, 400, 403, 404, 422, 429),
             openapi_extra={"requestBody": {"required": False, "content": {
                 "application/json": {"schema": RerunIn.model_json_schema()}}}})
def rerun_bot_run(request: HttpRequest, name: str, response: HttpResponse, number: int = Path(..., ge=1, le=MAX_ID)):
    """A new run with the same manifest: session config, participants, provider, model,
    temperature, instructions, memory, limits, seed and budget. The body is optional:
    `{"use_cache": true}` answers identical requests from the replay cache (default: as
    the run had it)."""
    run = services.get_run(request.auth, name, number)
    payload = RerunIn()
    if request.body.strip():
        try:
            payload = RerunIn.model_validate_json(request.body)
        except PydanticValidationError as exc:
            raise ValidationError({"use_cache": [f"send an empty body or {{\"use_cache\": true|false}} "
                                                 f"({exc.errors()[0]['msg']})"]}) from None
    new = services.rerun(request.auth, run, use_cache=payload.use_cache, request=request)
    response["Location"] = f"/api/v1/instances/{name}/bot-runs/{new.number}"
    return Status(201, serialize(new))


@router.get("/{name}/bot-runs/{number}/manifest.json", summary="What a reviewer needs to run it again",
            response=responses({200: dict}, 404))
def bot_run_manifest(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    """Product version, provider (never its key), requested and returned models, parameters,
    seed, prompt templates, oTree release and session config, times, cache, budgets."""
    return download(services.get_run(request.auth, name, number), "manifest.json")


@router.get("/{name}/bot-runs/{number}/responses.csv", summary="Answers as CSV (one row per answered field)",
            response=responses({200: str}, 404))
def bot_run_responses(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    """Columns: session, participant, app, round, page, field, answer, reason, cached."""
    return download(services.get_run(request.auth, name, number), "responses.csv")


@router.get("/{name}/bot-runs/{number}/conversations.json", summary="Every model call of every bot",
            response=responses({200: dict}, 404))
def bot_run_conversations(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    return download(services.get_run(request.auth, name, number), "conversations.json")


@router.get("/{name}/bot-runs/{number}/summary.json", summary="Model, parameters, timings, tokens, errors",
            response=responses({200: dict}, 404))
def bot_run_summary(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    return download(services.get_run(request.auth, name, number), "summary.json")


@providers_router.get("", summary="Model providers and their models", response=responses({200: list[ProviderOut]}))
def list_bot_providers(request: HttpRequest):
    """What `model` and `provider` of a new bot run may name (never an API key)."""
    return [{"name": p.name, "base_url": p.base_url, "models": p.model_names, "enabled": p.enabled}
            for p in Provider.objects.all()]
