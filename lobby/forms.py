from django import forms

from bots import services as bot_services
from bots.models import BotRun
from manager.accounts.forms import ServiceForm


class FillWithBotsForm(ServiceForm):
    """Fill a room's empty seats with bots (the rules are in bots.seats.fill)."""

    session_config = forms.ChoiceField(label="Session config",
                                       help_text="Of the live release; the session is created in this room.")
    num_participants = forms.IntegerField(label="Participants in the session", min_value=1, max_value=500,
                                          help_text="The ready participants keep their seats; bots take offline "
                                          "seats for the rest.")
    model = forms.ChoiceField(help_text="Models of the providers the lab configured, or the offline random policy.")
    temperature = forms.FloatField(min_value=0, max_value=2, initial=1.0)
    memory = forms.ChoiceField(choices=BotRun.Memory.choices, initial=BotRun.Memory.SUMMARY,
                               help_text="What a bot remembers of earlier pages.")
    instructions = forms.CharField(label="Extra instructions for the bots", required=False,
                                   max_length=bot_services.MAX_INSTRUCTIONS,
                                   widget=forms.Textarea(attrs={"rows": 3, "placeholder":
                                                                "You are a risk-averse student who …"}))
    budget_usd = forms.FloatField(label="Run budget (USD)", required=False, min_value=0.0001,
                                  help_text="Optional: the bots stop when their estimated cost reaches it.")
    time_limit_minutes = forms.IntegerField(label="Stop after (minutes)", min_value=1, max_value=24 * 60, initial=60)

    def __init__(self, *args, ref=None, seats=None, **kwargs):
        super().__init__(*args, **kwargs)
        live = ref.instance.live_release if ref is not None else None
        configs = (live.session_configs if live else None) or []
        self.fields["session_config"].choices = [(c["name"], f"{c['name']} — {c.get('display_name', '')}")
                                                 for c in configs]
        self.fields["model"].choices = bot_services.model_options()
        if configs and ref is not None and not self.is_bound:
            self.initial.update(default_config(ref, configs, seats or {}))


def default_config(ref, configs: list[dict], seats: dict) -> dict:
    """The config of the room's last bot run if the release still has it; else the first
    whose demo size fits the room's humans and offline seats; else the first."""
    names = [c["name"] for c in configs]
    last = BotRun.objects.filter(room=ref.row).order_by("-pk").values_list("session_config", flat=True).first()
    room_size = len(seats.get("humans", [])) + len(seats.get("offline", []))
    fitting = [c for c in configs if 0 < (c.get("num_demo_participants") or 0) <= room_size
               and (c.get("num_demo_participants") or 0) > len(seats.get("humans", []))]
    chosen = next((c for c in configs if c["name"] == last), None) if last in names else None
    chosen = chosen or (fitting[0] if fitting else configs[0])
    return {"session_config": chosen["name"], "num_participants": chosen.get("num_demo_participants") or 1}
