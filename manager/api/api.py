"""The JSON API, version 1: `/api/v1/`, bearer tokens, OpenAPI at `/api/v1/openapi.json`,
interactive docs at `/api/v1/docs` (Swagger UI served from ninja's bundled static files,
no CDN).

Each area has its own router module; add new ones (instances, …) below.
"""

from ninja import NinjaAPI, Swagger

from manager.api import bot_runs, errors, instances, me, users
from manager.api.auth import BearerToken

DESCRIPTION = """\
Manage the lab's accounts and your own SSH keys (and, later, oTree instances).

Authenticate every call with `Authorization: Bearer <token>`, using a personal access
token from *Settings → Access tokens* or `python manage.py create_token USERNAME`.

Every error is JSON `{"detail": "<readable text>"}`: 401 missing or bad token, 403 not
allowed, 404 not visible to you, 409 conflict (name taken), 422 invalid input
(the text names the field), 400 body is not JSON.
"""


class LabAPI(NinjaAPI):
    def get_openapi_operation_id(self, operation) -> str:
        return operation.view_func.__name__  # short and stable: list_users, add_my_ssh_key, …

    def get_openapi_schema(self, *args, **kwargs):
        schema = super().get_openapi_schema(*args, **kwargs)
        for methods in schema.get("paths", {}).values():
            for operation in methods.values():
                for status, response in operation.get("responses", {}).items():
                    if int(status) in errors.DESCRIPTIONS:
                        response["description"] = errors.DESCRIPTIONS[int(status)]
        return schema


api = LabAPI(
    title="oTree Lab Manager API",
    version="1",
    description=DESCRIPTION,
    urls_namespace="api",
    auth=BearerToken(),
    docs=Swagger(settings={"persistAuthorization": False}),
)
errors.install(api)
api.add_router("/instances", instances.router)
api.add_router("/instances", bot_runs.router)
api.add_router("/bot-providers", bot_runs.providers_router)
api.add_router("/users", users.router)
api.add_router("/me", me.router)
