from django import forms

from bots import services
from bots.models import BotRun, Provider
from manager.accounts.forms import ServiceForm


class ProviderForm(ServiceForm):
    name = forms.CharField(max_length=60, widget=forms.TextInput(attrs={"placeholder": "OpenAI"}))
    base_url = forms.URLField(label="Base URL", max_length=300, assume_scheme="https",
                              widget=forms.URLInput(attrs={"placeholder": "https://api.openai.com/v1"}),
                              help_text="The OpenAI-compatible endpoint: <code>https://api.openai.com/v1</code>, "
                              "<code>https://openrouter.ai/api/v1</code>, "
                              "<code>https://generativelanguage.googleapis.com/v1beta/openai</code>, "
                              "<code>https://api.mistral.ai/v1</code>, or a local vLLM / Ollama / llama.cpp "
                              "server such as <code>http://127.0.0.1:11434/v1</code>.")
    api_key = forms.CharField(label="API key", required=False, max_length=500,
                              widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
                              help_text="Stored encrypted; never shown again. Leave empty to keep the stored key "
                              "(or for a local server without keys).")
    models = forms.CharField(widget=forms.Textarea(attrs={"rows": 4, "class": "font-monospace", "spellcheck": "false",
                                                          "placeholder": "gpt-4o-mini 0.15 0.60\ngpt-4o 2.50 10"}),
                             help_text="One model per line: its name, then optionally its price in USD per million "
                             "input and output tokens (for the estimated cost).")
    response_format = forms.ChoiceField(label="Structured output", choices=Provider.ResponseFormat.choices,
                                        help_text="How the answer format is requested; choose the prompt-only way for "
                                        "servers that reject <code>response_format</code>.")
    timeout_seconds = forms.IntegerField(label="Request timeout (s)", min_value=1, max_value=600, initial=60)
    requests_per_minute = forms.IntegerField(label="Lab-wide limit (requests per minute)", min_value=0, initial=0,
                                             help_text="Shared by every run and worker; 0 = only each run's own limit.")
    enabled = forms.BooleanField(required=False, initial=True)


class BotRunForm(ServiceForm):
    session_config = forms.ChoiceField(label="Session config")
    num_participants = forms.IntegerField(label="Participants", min_value=1, max_value=500)
    num_bots = forms.IntegerField(label="Of them bots", min_value=1, max_value=200,
                                  help_text="The first participants are bots; the others are human seats whose "
                                  "links the run page shows.")
    model = forms.ChoiceField(help_text="Models of the providers the lab configured, or the offline random policy.")
    temperature = forms.FloatField(min_value=0, max_value=2, initial=1.0)
    memory = forms.ChoiceField(choices=BotRun.Memory.choices, initial=BotRun.Memory.SUMMARY,
                               help_text="What a bot remembers of earlier pages.")
    instructions = forms.CharField(label="Extra instructions for the bots", required=False,
                                   max_length=services.MAX_INSTRUCTIONS,
                                   widget=forms.Textarea(attrs={"rows": 3, "placeholder":
                                                                "You are a risk-averse student who …"}))
    rate_limit = forms.IntegerField(label="Rate limit (model requests per minute)", min_value=1, max_value=6000,
                                    initial=60)
    concurrency = forms.IntegerField(label="Concurrency (model requests at once)", min_value=1, max_value=200,
                                     initial=10)
    time_limit_minutes = forms.IntegerField(label="Stop after (minutes)", min_value=1, max_value=24 * 60, initial=60)
    budget_usd = forms.FloatField(label="Budget (USD)", required=False, min_value=0.000001,
                                  max_value=services.MAX_BUDGET,
                                  help_text="The run stops when its model calls cost this much (empty: no cap "
                                  "of its own; your monthly bot budget still applies).")
    seed = forms.IntegerField(required=False, min_value=0, max_value=services.MAX_SEED,
                              help_text="Sent to the provider (OpenAI-compatible APIs take a seed for more "
                              "repeatable answers) and recorded in the manifest.")
    use_cache = forms.BooleanField(label="Use the replay cache", required=False,
                                   help_text="Identical requests are answered from the lab's cache of earlier "
                                   "replies (no cost), and new replies are stored, so this run can be replayed.")

    def __init__(self, *args, instance=None, **kwargs):
        super().__init__(*args, **kwargs)
        live = instance.live_release if instance is not None else None
        configs = live.session_configs if live else []
        self.fields["session_config"].choices = [(c["name"], f"{c['name']} — {c.get('display_name', '')}")
                                                 for c in configs]
        self.fields["model"].choices = services.model_options()
        if configs and not self.is_bound:
            first = configs[0]
            self.initial.setdefault("num_participants", first.get("num_demo_participants") or 1)
            self.initial.setdefault("num_bots", first.get("num_demo_participants") or 1)


class BotExperimentForm(ServiceForm):
    """A design of bot runs; the lists are parsed by `experiment_views.design_from_form`
    and checked by `experiments.normalise_design` (its errors land on these fields)."""

    title = forms.CharField(required=False, max_length=200,
                            widget=forms.TextInput(attrs={"placeholder": "Temperature and framing, pilot"}))
    session_config = forms.ChoiceField(label="Session config")
    num_participants = forms.IntegerField(label="Participants per session", min_value=1, max_value=500)
    num_bots = forms.IntegerField(label="Of them bots", min_value=1, max_value=200)
    models = forms.MultipleChoiceField(widget=forms.CheckboxSelectMultiple,
                                       help_text="One run per model (and per temperature, variant, memory mode and "
                                       "repetition); any providers.")
    temperatures = forms.CharField(initial="1.0", max_length=500,
                                   help_text="Comma-separated, e.g. <code>0, 0.7</code>.")
    instructions = forms.CharField(label="Instruction variants", required=False, max_length=40000,
                                   widget=forms.Textarea(attrs={"rows": 3, "placeholder":
                                                                "plain:\nrisk: You are a risk-averse student."}),
                                   help_text="One per line: <code>name: extra instructions</code> (the text may be "
                                   "empty). Empty: one variant without extra instructions.")
    memory = forms.MultipleChoiceField(label="Memory modes", choices=BotRun.Memory.choices,
                                       initial=[BotRun.Memory.SUMMARY], widget=forms.CheckboxSelectMultiple)
    repetitions = forms.IntegerField(min_value=1, max_value=100, initial=1,
                                     help_text="Runs of every combination.")
    max_parallel = forms.IntegerField(label="Runs at once", min_value=1, initial=2)
    rate_limit = forms.IntegerField(label="Rate limit of each run (requests per minute)", min_value=1,
                                    max_value=6000, initial=60)
    concurrency = forms.IntegerField(label="Concurrency of each run", min_value=1, max_value=200, initial=10)
    time_limit_minutes = forms.IntegerField(label="Each run stops after (minutes)", min_value=1, max_value=24 * 60,
                                            initial=60)
    budget_usd = forms.FloatField(label="Experiment budget (USD)", required=False, min_value=0,
                                  help_text="Empty: no cap. At the cap no further run starts.")
    run_budget_usd = forms.FloatField(label="Budget of each run (USD)", required=False, min_value=0)
    use_cache = forms.BooleanField(label="Replay cache", required=False,
                                   help_text="Identical requests are answered from the cache.")

    def __init__(self, *args, instance=None, **kwargs):
        from django.conf import settings

        super().__init__(*args, **kwargs)
        live = instance.live_release if instance is not None else None
        configs = live.session_configs if live else []
        self.fields["session_config"].choices = [(c["name"], f"{c['name']} — {c.get('display_name', '')}")
                                                 for c in configs]
        self.fields["models"].choices = services.model_options()
        self.fields["max_parallel"].help_text = (f"At most {settings.LAB_BOT_RUNS} (LAB_BOT_RUNS, the runs the lab "
                                                 "plays at once); runs share each provider's lab-wide rate limit.")
        self.fields["max_parallel"].initial = min(2, settings.LAB_BOT_RUNS)
        if configs and not self.is_bound:
            first = configs[0]
            self.initial.setdefault("num_participants", first.get("num_demo_participants") or 1)
            self.initial.setdefault("num_bots", first.get("num_demo_participants") or 1)
