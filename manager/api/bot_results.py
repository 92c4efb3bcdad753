"""Results of bot runs and experiments (bots/results.py) and preflights (bots/preflight.py):
the same access rules as the pages (the instance's owner and lab managers; others 404)."""

from django.http import HttpRequest, HttpResponse
from ninja import Path, Router, Status
from ninja.errors import HttpError
from pydantic import Field

from bots import experiments, preflight, results, services
from bots.models import BotRun
from bots.results_views import results_response
from instances.selectors import get_visible_instance
from manager.api.bot_runs import BotRunOut, serialize
from manager.api.errors import responses
from manager.api.schemas import MAX_ID, InputSchema, Whole, column, rules, text

router = Router(tags=["bot runs"])


def _results(found_by, kind: str):
    try:
        return results_response(found_by(), kind)
    except results.ResultsRefused as exc:
        raise HttpError(409, str(exc)) from None


def _experiment(request, name, number):
    return results.for_experiment(experiments.get_experiment(request.auth, name, number))


def _run(request, name, number):
    return results.for_run(services.get_run(request.auth, name, number))


@router.get("/{name}/bot-experiments/{number}/results.csv", summary="An experiment's results as one tidy CSV",
            response=responses({200: str}, 404, 409))
def bot_experiment_results_csv(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    """One row per accepted answered field: experiment, run, the design's factors (model, provider,
    temperature, instructions, memory, repetition; other factors as `factor_<key>`), returned_model,
    seed, session, participant, bot, label, app, round, page, field, answer, reason, cached; joined
    from oTree's wide export of each run's session: `otree_participant_payoff`, `otree_player_payoff`,
    `otree_field_value` (oTree's stored value of the row's field) and `otree_player_<field>` for the
    row's app and round; `otree_note` says why they are empty when oTree's data could not be read
    (the bot data are there all the same). 409 over 100000 answers."""
    return _results(lambda: _experiment(request, name, number), "results.csv")


@router.get("/{name}/bot-experiments/{number}/results.parquet", summary="An experiment's results as Parquet",
            response=responses({200: str}, 404, 409))
def bot_experiment_results_parquet(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    """The columns of results.csv, typed (numbers as numbers, `cached` as a boolean)."""
    return _results(lambda: _experiment(request, name, number), "results.parquet")


@router.get("/{name}/bot-experiments/{number}/manifests.json", summary="The manifests of an experiment's runs",
            response=responses({200: dict}, 404, 409))
def bot_experiment_manifests(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    """Each run's manifest (its parameters and summary when it recorded none) and whether
    oTree's data could be joined."""
    return _results(lambda: _experiment(request, name, number), "manifests.json")


@router.get("/{name}/bot-experiments/{number}/results.zip", summary="results.csv, results.parquet, manifests.json",
            response=responses({200: str}, 404, 409))
def bot_experiment_results_zip(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    return _results(lambda: _experiment(request, name, number), "results.zip")


@router.get("/{name}/bot-runs/{number}/results.csv", summary="A run's results as one tidy CSV",
            response=responses({200: str}, 404, 409))
def bot_run_results_csv(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    """The columns of the experiments' results.csv, for one run."""
    return _results(lambda: _run(request, name, number), "results.csv")


@router.get("/{name}/bot-runs/{number}/results.parquet", summary="A run's results as Parquet",
            response=responses({200: str}, 404, 409))
def bot_run_results_parquet(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    return _results(lambda: _run(request, name, number), "results.parquet")


@router.get("/{name}/bot-runs/{number}/manifests.json", summary="The run's manifest (as a list of one)",
            response=responses({200: dict}, 404, 409))
def bot_run_manifests(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    return _results(lambda: _run(request, name, number), "manifests.json")


@router.get("/{name}/bot-runs/{number}/results.zip", summary="results.csv, results.parquet, manifests.json of a run",
            response=responses({200: str}, 404, 409))
def bot_run_results_zip(request: HttpRequest, name: str, number: int = Path(..., ge=1, le=MAX_ID)):
    return _results(lambda: _run(request, name, number), "results.zip")


class PreflightIn(InputSchema):
    session_config: str = Field(description="a session config of the live release (422 when there is none)",
                                **text(max_length=column(BotRun, "session_config"), single_line=True))
    num_participants: Whole = Field(description="participants of the oTree session (all of them bots)",
                                    **rules(minimum=services.LIMITS["num_bots"][0],
                                            maximum=services.LIMITS["num_bots"][1]))


@router.post("/{name}/bot-preflight", summary="Preflight a session config (random bots; which pages can bots play?)",
             response=responses({201: BotRunOut}, 400, 403, 404, 422, 429))
def start_bot_preflight(request: HttpRequest, name: str, payload: PreflightIn, response: HttpResponse):
    """A bot run with the offline random policy, every participant a bot (no model, no
    cost). Its `report` (in `GET .../bot-runs/{id}`, filled as the bots meet the pages)
    lists every page with its fields and the problems: `javascript` (a field filled by a
    script), `live` (a live page), `widget` (inputs bots do not understand), `trials`, and
    `stuck` (a bot gave up, with the reason)."""
    instance = get_visible_instance(request.auth, name)
    run = preflight.start(request.auth, instance, session_config=payload.session_config,
                          num_participants=payload.num_participants, request=request)
    response["Location"] = f"/api/v1/instances/{name}/bot-runs/{run.number}"
    return Status(201, serialize(run))


# Operations whose success is not JSON (manager/api/api.py documents their content type).
CONTENT_TYPES = {f"{prefix}_{suffix}": content_type
                 for prefix in ("bot_experiment", "bot_run")
                 for suffix, content_type in (("results_csv", "text/csv"),
                                              ("results_parquet", "application/vnd.apache.parquet"),
                                              ("results_zip", "application/zip"))}
