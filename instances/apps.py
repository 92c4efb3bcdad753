from django.apps import AppConfig


class InstancesConfig(AppConfig):
    name = "instances"

    def ready(self):
        from instances import realtime  # noqa: F401  (registers the "instance" topics and the log followers)
        from instances import tasks  # noqa: F401  (registers its Celery tasks: services enqueue them by name)
        from instances.git import webcap
        from instances.runtime import check_setting

        check_setting()  # LAB_RUNTIME names an existing backend: else start-up stops with one sentence

        from django.core import checks

        from instances import proxy

        checks.register(proxy.system_check)  # LAB_TLS=files: the certificate and key files

        webcap.install()  # in the web server (daphne): request bodies are capped while they arrive
