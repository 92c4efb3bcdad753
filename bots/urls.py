"""Included as /instances/<name>/bot-runs/ (before the instances' own URLs)."""

from django.urls import path

from bots import views

urlpatterns = [
    path("", views.run_list, name="bot_runs"),
    path("<int:number>/", views.run_detail, name="bot_run"),
    path("<int:number>/stop/", views.run_stop, name="bot_run_stop"),
    path("<int:number>/<str:kind>", views.run_download, name="bot_run_download"),
]

provider_urlpatterns = [
    path("", views.provider_list, name="bot_providers"),
    path("<int:provider_id>/", views.provider_edit, name="bot_provider"),
    path("<int:provider_id>/delete/", views.provider_delete, name="bot_provider_delete"),
]
