from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "manager.accounts"
    label = "accounts"

    def ready(self):
        from manager.accounts import signals  # noqa: F401
