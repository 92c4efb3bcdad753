from django.apps import AppConfig


class RealtimeConfig(AppConfig):
    name = "manager.realtime"
    label = "realtime"
