"""Included as /instances/<name>/bot-runs/ (before the instances' own URLs)."""

from django.urls import path, register_converter

from bots import experiment_views, results_views, views


class ResultsKind:
    """The results downloads (bots/results.py): results.csv, .parquet, .zip, manifests.json."""

    regex = r"results\.(?:csv|parquet|zip)|manifests\.json"

    def to_python(self, value):
        return value

    def to_url(self, value):
        return value


register_converter(ResultsKind, "results")

urlpatterns = [
    path("", views.run_list, name="bot_runs"),
    path("preflight/", results_views.preflight_start, name="bot_preflight"),
    path("experiments/", experiment_views.experiment_list, name="bot_experiments"),
    path("experiments/<int:number>/", experiment_views.experiment_detail, name="bot_experiment"),
    path("experiments/<int:number>/stop/", experiment_views.experiment_stop, name="bot_experiment_stop"),
    path("experiments/<int:number>/rerun/", experiment_views.experiment_rerun, name="bot_experiment_rerun"),
    path("<int:number>/", views.run_detail, name="bot_run"),
    path("<int:number>/stop/", views.run_stop, name="bot_run_stop"),
    path("<int:number>/<results:kind>", results_views.run_results, name="bot_run_results"),
    path("experiments/<int:number>/<results:kind>", results_views.experiment_results, name="bot_experiment_results"),
    path("<int:number>/rerun/", views.run_rerun, name="bot_run_rerun"),
    path("<int:number>/<str:kind>", views.run_download, name="bot_run_download"),
]

provider_urlpatterns = [
    path("", views.provider_list, name="bot_providers"),
    path("<int:provider_id>/", views.provider_edit, name="bot_provider"),
    path("<int:provider_id>/delete/", views.provider_delete, name="bot_provider_delete"),
]
