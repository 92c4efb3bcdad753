"""The JSON API, version 1: `/api/v1/`, bearer tokens, OpenAPI at `/api/v1/openapi.json`,
interactive docs at `/api/v1/docs` (Swagger UI served from ninja's bundled static files,
no CDN).

Each area has its own router module; add new ones (instances, …) below.
"""

from ninja import NinjaAPI, Swagger

from manager.api import bot_experiments, bot_results, bot_runs, errors, instances, me, nodes, users
from manager.api.auth import BearerToken

DESCRIPTION = """\
Manage the lab's accounts, your own SSH keys, oTree instances and their bot runs, and the swarm's nodes.

Authenticate every call with `Authorization: Bearer <token>`, using a personal access
token from *Settings → Access tokens* or `python manage.py create_token USERNAME`.

This document is complete and strict: every rule the server enforces on an input
(ranges, patterns, choices, lengths, which field another one requires) is stated in its
schema, input types are never coerced (`0` is no boolean, `"512"` no number), unknown
fields are refused, and each operation lists every status it can answer with its content
type. What depends on stored data (a name that is taken, an owner that must exist, a
session config of the live release) is said in the field's description.

Every error is JSON `{"detail": "<readable text>"}`: 400 body is not JSON, 401 missing
or bad token, 403 not allowed, 404 not visible to you, 409 conflict (name taken), 413
body too large, 422 invalid input (the text names the field), 429 too many of a
destructive or costly action (wait the `Retry-After` seconds).
"""

# Error statuses every operation that reads a JSON body can answer (whatever it declares).
BODY_ERRORS = (400, 413, 422)
DESCRIPTIONS = {
    **errors.DESCRIPTIONS,
    413: "The request body is too large.",
    422: "Invalid input; `detail` names the field (a path parameter too: an id that is not a "
         "whole number from 1 to 2147483647).",
    429: "Too many of these actions for now (per user and per instance); `Retry-After` says "
         "in how many seconds to try again.",
}
HEADERS = {
    401: {"WWW-Authenticate": {"description": "The Bearer challenge (RFC 6750).", "required": True,
                               "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait before trying again.", "required": True,
                          "schema": {"type": "integer", "minimum": 0}}},
}
# Operations whose success is not JSON: {operationId: content type of the 2xx answer}.
CONTENT_TYPES = {"bot_run_responses": "text/csv", **bot_results.CONTENT_TYPES, "instance_data": "application/zip",
                 "backup_data": "application/zip"}


def _error_response(status: int) -> dict:
    response = {"description": DESCRIPTIONS[status],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if status in HEADERS:
        response["headers"] = HEADERS[status]
    return response


class LabAPI(NinjaAPI):
    def get_openapi_operation_id(self, operation) -> str:
        return operation.view_func.__name__  # short and stable: list_users, add_my_ssh_key, …

    def get_openapi_schema(self, *args, **kwargs):
        schema = super().get_openapi_schema(*args, **kwargs)
        for methods in schema.get("paths", {}).values():
            for operation in methods.values():
                complete(operation)
        return schema


def complete(operation: dict) -> None:
    """Add what ninja leaves out of an operation: the errors any body or integer path
    parameter can cause, the headers of 401 and 429, the real content type."""
    responses = {str(status): response for status, response in operation.get("responses", {}).items()}
    statuses = {int(status) for status in responses}
    if "requestBody" in operation:
        statuses.update(BODY_ERRORS)
    if any(p.get("in") == "path" and p.get("schema", {}).get("type") == "integer"
           for p in operation.get("parameters", ())):
        statuses.add(422)
    for status in sorted(statuses):
        if status >= 400:
            responses[str(status)] = _error_response(status)
    content_type = CONTENT_TYPES.get(operation.get("operationId"))
    if content_type:
        for status, response in responses.items():
            if status.startswith("2"):
                response["content"] = {content_type: {"schema": {"type": "string"}}}
    operation["responses"] = dict(sorted(responses.items()))


api = LabAPI(
    title="oTree Lab Manager API",
    version="1",
    description=DESCRIPTION,
    urls_namespace="api",
    auth=BearerToken(),
    docs=Swagger(settings={"persistAuthorization": False}),
    parser=errors.StrictJSONParser(),
)
errors.install(api)
api.add_router("/instances", instances.router)
api.add_router("/instances", bot_runs.router)
api.add_router("/instances", bot_results.router)
api.add_router("/instances", bot_experiments.router)
api.add_router("/bot-providers", bot_runs.providers_router)
api.add_router("/nodes", nodes.router)
api.add_router("/users", users.router)
api.add_router("/me", me.router)
