from django.apps import AppConfig


class LobbyConfig(AppConfig):
    name = "lobby"

    def ready(self):
        from lobby import realtime  # noqa: F401  (registers the "lobby" topic and the kiosk socket's route)
