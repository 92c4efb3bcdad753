from django.apps import AppConfig


class ManagerConfig(AppConfig):
    name = "manager"
    verbose_name = "oTree Lab Manager"
