from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "manager.jobs"
    label = "jobs"
