from django.apps import AppConfig


class BotsConfig(AppConfig):
    name = "bots"
    verbose_name = "LLM bot runs"

    def ready(self):
        from bots import realtime  # noqa: F401  (registers the botrun realtime topic)
        from bots import experiments  # noqa: F401  (registers the botexperiment topic and the run-end hook)
        from bots import tasks  # noqa: F401  (registers its Celery tasks: services enqueue them by name)
        from bots.seats import bot_seats
        from lobby import services as lobby

        if bot_seats not in lobby.SEAT_HOLDERS:
            lobby.SEAT_HOLDERS.append(bot_seats)  # the seat board shows the seats bots hold
