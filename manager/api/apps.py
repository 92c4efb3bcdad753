from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "manager.api"
    label = "api"
