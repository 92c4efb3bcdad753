from django.apps import AppConfig


class InstancesConfig(AppConfig):
    name = "instances"

    def ready(self):
        from instances import realtime  # noqa: F401  (registers the "instance" topic)
