from django.urls import path

from instances.git.http import git_http

urlpatterns = [
    path("<str:name>.git/<path:path>", git_http, name="git_http"),
]
