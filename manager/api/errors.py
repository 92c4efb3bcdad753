"""Every API error is `{"detail": "<one readable string>"}` with a telling status.

401 missing or bad token, 403 not allowed, 404 not visible, 405 wrong method,
409 conflict (`services.Conflict`), 422 invalid input (request validation and the
services' `ValidationError`s, flattened to "field: message"), 400 unparsable body,
429 a rate limit (`manager.throttle.Throttled`, with `Retry-After` in seconds); a body
whose JSON object names a key twice is 422 too (`StrictJSONParser`: never the last one
silently).
"""

import json
import logging
from functools import wraps

from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpResponseNotAllowed, JsonResponse
from django.http.multipartparser import MultiPartParserError
from ninja import NinjaAPI
from ninja.parser import Parser
from ninja.errors import HttpError
from ninja.errors import ValidationError as NinjaValidationError

from manager.accounts.services import Conflict, NotAllowed
from manager.api.auth import CHALLENGE
from manager.api.schemas import Error
from manager.throttle import Throttled

log = logging.getLogger("manager.api")

# Responses documented per operation (see `responses()`).
DESCRIPTIONS = {
    400: "The request body is not valid JSON.",
    401: "No token, or an invalid or revoked token, or a deactivated account.",
    403: "The caller may not do this.",
    404: "Not found, or not visible to the caller.",
    409: "Conflicts with existing data (e.g. the name is taken).",
    422: "Invalid input; `detail` names the field.",
}


def _sentence(text: str) -> str:
    text = str(text).strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def django_detail(exc: DjangoValidationError) -> str:
    """'email: 'x' is not a valid e-mail address. name: At most 150 characters …'"""
    if hasattr(exc, "error_dict"):
        parts = []
        for field, messages in exc.message_dict.items():
            text = " ".join(_sentence(m) for m in messages)
            parts.append(text if field == NON_FIELD_ERRORS else f"{field}: {text}")
        return " ".join(parts)
    return " ".join(_sentence(m) for m in exc.messages)


def _pydantic_message(error: dict) -> str:
    kind = error.get("type", "")
    if kind == "missing":
        return "this field is required."
    if kind == "extra_forbidden":
        return "unknown field."
    return _sentence(error.get("msg", "invalid value"))


def pydantic_detail(errors: list[dict]) -> str:
    """ninja's error list → "name: String should have at most 150 characters." """
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ())]
        source = loc.pop(0) if loc else ""
        if source == "body" and loc:
            loc.pop(0)  # the view's parameter name, meaningless to the caller
        if source == "body" and not loc:  # the body as a whole
            if error.get("type") == "missing":
                part = "The request body is missing: send a JSON object."
            else:
                part = "The request body must be a JSON object."
        else:
            part = f"{'.'.join(loc) or source or 'input'}: {_pydantic_message(error)}"
        if part not in parts:
            parts.append(part)
    return " ".join(parts) or "Invalid input."


def _body_error(request, exc: HttpError) -> str:
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):
        text = f"The request body is not valid JSON: {cause.msg} (line {cause.lineno}, column {cause.colno})."
    elif isinstance(cause, UnicodeDecodeError):
        text = "The request body is not valid JSON: it is not UTF-8 text."
    else:
        return _sentence(str(exc))
    if request.content_type != "application/json":
        text += " Send a JSON object with the header 'Content-Type: application/json'."
    return text


class DuplicateKey(ValueError):
    """A JSON object of the body names a key twice (which one counts would be a guess)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _one_of_each(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


class StrictJSONParser(Parser):
    """ninja's parser, but a body whose object names a key twice is refused (json.loads
    keeps the last one silently): 422 naming the key."""

    def parse_body(self, request):
        return json.loads(request.body, object_pairs_hook=_one_of_each)


def error_response(status: int, detail: str, **headers) -> JsonResponse:
    response = JsonResponse({"detail": detail}, status=status)
    for key, value in headers.items():
        response[key.replace("_", "-")] = value
    return response


def install(api: NinjaAPI) -> None:
    def handles(exc_class):
        def register(fn):
            api.add_exception_handler(exc_class, fn)
            return fn

        return register

    @handles(HttpError)  # ninja's own: auth (401/403), unparsable body (400), throttling; ours: 404
    def http_error(request, exc):
        if isinstance(exc.__cause__, DuplicateKey):
            key = json.dumps(exc.__cause__.key, ensure_ascii=False)
            return error_response(422, f"The request body gives the key {key} twice in one object; send each key "
                                       "once.")
        if exc.status_code == 400 and exc.__cause__ is not None:
            return error_response(400, _body_error(request, exc))
        headers = {}
        if exc.status_code == 401:
            headers["WWW_Authenticate"] = getattr(exc, "www_authenticate", CHALLENGE)
        return error_response(exc.status_code, _sentence(str(exc)), **headers)

    @handles(NinjaValidationError)
    def request_invalid(request, exc):
        return error_response(422, pydantic_detail(exc.errors))

    @handles(Conflict)
    def conflict(request, exc):
        return error_response(409, django_detail(exc))

    @handles(DjangoValidationError)
    def invalid(request, exc):
        return error_response(422, django_detail(exc))

    @handles(NotAllowed)
    def not_allowed(request, exc):
        return error_response(403, _sentence(str(exc)))

    @handles(PermissionDenied)
    def denied(request, exc):
        return error_response(403, _sentence(str(exc) or "You may not do this"))

    @handles(Http404)
    def not_found(request, exc):
        return error_response(404, _sentence(str(exc) or "Not found"))

    @handles(Throttled)  # a rate limit of a destructive or costly action (manager.throttle)
    def throttled(request, exc):
        return error_response(429, exc.detail, Retry_After=str(exc.retry_after))

    @handles(RequestDataTooBig)
    def too_big(request, exc):
        return error_response(413, "The request body is too large.")

    @handles(MultiPartParserError)  # an upload's body (e.g. multipart without a boundary)
    def bad_multipart(request, exc):
        return error_response(400, "The request body is not a valid multipart/form-data body (with a boundary).")

    @handles(SuspiciousOperation)
    def suspicious(request, exc):
        return error_response(400, "Bad request.")

    @handles(Exception)
    def crashed(request, exc):
        log.error("API request %s %s failed", request.method, request.path, exc_info=exc)
        return error_response(500, "Internal error; the details are in the server log.")


def responses(ok: dict, *errors: int) -> dict:
    """The `response=` of an operation: its success schema(s) plus the documented errors
    (401 always)."""
    return {**ok, **{code: Error for code in sorted({401, *errors})}}


def json_method_not_allowed(view):
    """Wrap a ninja URL callback so a wrong method gets a JSON 405 too."""

    @wraps(view)
    def wrapper(request, *args, **kwargs):
        response = view(request, *args, **kwargs)
        if isinstance(response, HttpResponseNotAllowed):
            allowed = response["Allow"]
            return error_response(
                405, f"Method {request.method} is not allowed here; use {allowed}.", Allow=allowed
            )
        return response

    return wrapper


def api_not_found(request, path=""):
    hint = " API paths have no trailing slash." if request.path.endswith("/") and path else ""
    return error_response(404, f"There is no API endpoint at {request.path}.{hint} See /api/v1/docs.")
