"""`/api/v1/` (included from manager/urls.py). Besides ninja's own URLs: a small public
index at the root, JSON 405s for wrong methods, and a JSON 404 for unknown paths."""

from django.http import JsonResponse
from django.urls import path, re_path

from manager.api.api import api
from manager.api.errors import api_not_found, json_method_not_allowed


def index(request):
    """Where to start; public (it holds no data)."""
    return JsonResponse({
        "name": api.title,
        "version": api.version,
        "openapi": request.path + api.openapi_url.lstrip("/"),
        "docs": request.path + api.docs_url.lstrip("/"),
        "authentication": "Authorization: Bearer <personal access token>",
    })


_patterns, _app_name, _namespace = api.urls
for _pattern in _patterns:
    if _pattern.name == "api-root":
        _pattern.callback = index
    else:
        _pattern.callback = json_method_not_allowed(_pattern.callback)

urlpatterns = [
    path("", (_patterns, _app_name, _namespace)),
    re_path(r"^(?P<path>.*)$", api_not_found),
]
