"""Bot runs: language models (or the offline random policy) taking part in an instance's
oTree session.

- `Provider`: an OpenAI-compatible endpoint the lab configured (base URL, API key stored
  encrypted, the models it offers with their prices).
- `BotRun`: one run on one instance: the oTree session it created, its parameters, its
  status and the heartbeat of the worker that drives it.
- `Bot`: one participant played by a bot: where it is, what it spent, why it gave up.
- `ModelCall`: every request to the model (failed attempts included): prompt, response,
  tokens, latency.
- `Answer`: every form field a bot submitted, recorded before the submission (pending) and
  settled after oTree's answer (accepted or rejected) — so a resumed bot re-sends the
  same answers instead of asking the model again.
"""

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from manager.crypto import EncryptedTextField

RANDOM_POLICY = "random"


class Provider(models.Model):
    class ResponseFormat(models.TextChoices):
        JSON_OBJECT = "json_object", "JSON mode (response_format json_object)"
        JSON_SCHEMA = "json_schema", "JSON schema (response_format json_schema, strict)"
        PROMPT = "prompt", "none: the schema is only described in the prompt"

    name = models.CharField(max_length=60, unique=True)
    base_url = models.URLField(max_length=300)
    api_key = EncryptedTextField(blank=True)  # never shown again after entry
    # [{"name": "gpt-4o-mini", "input_per_million": 0.15, "output_per_million": 0.6}, ...]
    offered_models = models.JSONField(default=list)
    response_format = models.CharField(max_length=20, choices=ResponseFormat.choices,
                                       default=ResponseFormat.JSON_OBJECT)
    timeout_seconds = models.PositiveIntegerField(default=60, validators=[MinValueValidator(1),
                                                                          MaxValueValidator(600)])
    # Lab-wide pacing of this provider (all runs, all workers); 0 = only each run's own limit.
    requests_per_minute = models.PositiveIntegerField(default=0)
    enabled = models.BooleanField(default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def model_names(self) -> list[str]:
        return [m["name"] for m in self.offered_models]

    def price(self, model: str) -> tuple[float, float]:
        """USD per million input and output tokens (0 when unknown)."""
        for m in self.offered_models:
            if m["name"] == model:
                return float(m.get("input_per_million") or 0), float(m.get("output_per_million") or 0)
        return 0.0, 0.0


class BotExperiment(models.Model):
    """A design of bot runs on one instance: models x temperatures x instruction variants x
    memory modes x repetitions, expanded into BotRuns (`runs`) that the scheduler releases a
    few at a time under the providers' shared rate limits. `design` is the normalised design
    as submitted (what "Run again" repeats); budgets in USD (None: no cap)."""

    class Status(models.TextChoices):
        RUNNING = "running", "running"
        STOPPING = "stopping", "stopping"
        FINISHED = "finished", "finished"
        STOPPED = "stopped", "stopped"  # on request or at its budget (status_reason says which)
        FAILED = "failed", "failed"

    ACTIVE = (Status.RUNNING, Status.STOPPING)

    instance = models.ForeignKey("instances.Instance", on_delete=models.CASCADE, related_name="bot_experiments")
    number = models.PositiveIntegerField()  # 1, 2, 3 ... per instance
    title = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    design = models.JSONField(default=dict)
    budget_usd = models.FloatField(null=True, blank=True)  # whole experiment
    run_budget_usd = models.FloatField(null=True, blank=True)  # each run
    max_parallel = models.PositiveIntegerField(default=2)  # runs playing at once
    use_cache = models.BooleanField(default=False)  # replay cache for every run
    source = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="reruns")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.RUNNING, db_index=True)
    status_reason = models.CharField(max_length=500, blank=True)
    stop_requested = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-number"]
        constraints = [models.UniqueConstraint(fields=["instance", "number"], name="botexperiment_number_unique")]

    def __str__(self):
        return f"{self.instance.name} bot experiment #{self.number} [{self.status}]"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE


class BotRun(models.Model):
    class Status(models.TextChoices):
        WAITING = "waiting", "waiting for its turn"  # a run of an experiment not yet released
        QUEUED = "queued", "queued"
        STARTING = "starting", "starting"  # creating the oTree session
        RUNNING = "running", "running"
        STOPPING = "stopping", "stopping"
        FINISHED = "finished", "finished"
        STOPPED = "stopped", "stopped"
        FAILED = "failed", "failed"

    ACTIVE = (Status.QUEUED, Status.STARTING, Status.RUNNING, Status.STOPPING)
    NOT_ENDED = (Status.WAITING, *ACTIVE)

    class Memory(models.TextChoices):
        SUMMARY = "summary", "running summary (the bot keeps notes)"
        HISTORY = "history", "full history (every page and answer)"

    instance = models.ForeignKey("instances.Instance", on_delete=models.CASCADE, related_name="bot_runs")
    number = models.PositiveIntegerField()  # 1, 2, 3 ... per instance
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    # what to play
    session_config = models.CharField(max_length=100)
    num_participants = models.PositiveIntegerField()
    num_bots = models.PositiveIntegerField()
    # who plays: a provider's model, or the offline random policy (provider None)
    provider = models.ForeignKey(Provider, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    provider_name = models.CharField(max_length=60, blank=True)  # kept when the provider is deleted
    model = models.CharField(max_length=100)
    temperature = models.FloatField(default=1.0)
    instructions = models.TextField(blank=True)
    memory = models.CharField(max_length=10, choices=Memory.choices, default=Memory.SUMMARY)
    rate_limit = models.PositiveIntegerField(default=60)  # model requests per minute, whole run
    concurrency = models.PositiveIntegerField(default=10)  # model requests in flight at once
    time_limit_minutes = models.PositiveIntegerField(default=60)
    price_input = models.FloatField(default=0)  # USD per million tokens, copied at creation
    price_output = models.FloatField(default=0)
    class Purpose(models.TextChoices):
        PLAY = "play", "bot run"
        PREFLIGHT = "preflight", "preflight (random policy: which pages can bots play?)"

    purpose = models.CharField(max_length=10, choices=Purpose.choices, default=Purpose.PLAY)
    report = models.JSONField(default=dict, blank=True)  # preflight: the pages met, their fields, problems
    # experiments, budgets, reproducibility
    experiment = models.ForeignKey(BotExperiment, null=True, blank=True, on_delete=models.CASCADE,
                                   related_name="runs")
    factors = models.JSONField(default=dict, blank=True)  # the design's cell: {model, temperature, ...}
    repetition = models.PositiveIntegerField(default=1)
    budget_usd = models.FloatField(null=True, blank=True)  # cap of this run (None: none)
    use_cache = models.BooleanField(default=False)  # replay cache: identical requests answered from it
    seed = models.BigIntegerField(null=True, blank=True)  # sent to providers that take one
    manifest = models.JSONField(default=dict, blank=True)  # what a reviewer needs (see bots/manifest.py)
    returned_model = models.CharField(max_length=200, blank=True)  # the model id the provider answered with
    system_fingerprint = models.CharField(max_length=200, blank=True)
    source = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="reruns")
    # a lobby room's empty seats: the bots enter through the room with these labels
    room = models.ForeignKey("lobby.LobbyRoom", null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="bot_runs")
    seat_labels = models.JSONField(default=list, blank=True)  # labels the bots take
    # state
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED, db_index=True)
    status_reason = models.CharField(max_length=500, blank=True)
    stop_requested = models.BooleanField(default=False)
    session_code = models.CharField(max_length=40, blank=True)
    session_label = models.CharField(max_length=100, blank=True)  # finds the session again after a crash
    human_seats = models.JSONField(default=list, blank=True)  # [{id_in_session, code}]
    deliveries = models.PositiveIntegerField(default=0)  # times a worker picked the run up
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-number"]
        constraints = [models.UniqueConstraint(fields=["instance", "number"], name="botrun_number_unique")]

    def __str__(self):
        return f"{self.instance.name} bot run #{self.number} [{self.status}]"

    @property
    def is_random(self) -> bool:
        return self.model == RANDOM_POLICY and self.provider_id is None and not self.provider_name

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def deadline(self):
        start = self.started_at or self.created_at
        return start + timezone.timedelta(minutes=self.time_limit_minutes)

    @property
    def duration(self):
        if self.started_at:
            return (self.finished_at or timezone.now()) - self.started_at
        return None

    @property
    def status_color(self) -> str:
        return {"waiting": "light", "queued": "secondary", "starting": "info", "running": "primary", "stopping": "warning",
                "finished": "success", "stopped": "dark", "failed": "danger"}[self.status]


class Bot(models.Model):
    class Status(models.TextChoices):
        WAITING = "waiting", "not started"
        PLAYING = "playing", "playing"
        WAIT_PAGE = "wait_page", "on a wait page"
        THINKING = "thinking", "asking the model"
        FINISHED = "finished", "finished"
        GAVE_UP = "gave_up", "gave up"
        STOPPED = "stopped", "stopped"

    DONE = (Status.FINISHED, Status.GAVE_UP, Status.STOPPED)

    run = models.ForeignKey(BotRun, on_delete=models.CASCADE, related_name="bots")
    index = models.PositiveIntegerField()  # 1..num_bots
    participant_code = models.CharField(max_length=40)
    id_in_session = models.PositiveIntegerField()
    label = models.CharField(max_length=200, blank=True)  # participant label (a lobby seat's)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.WAITING)
    reason = models.CharField(max_length=500, blank=True)  # why it gave up or stopped
    app = models.CharField(max_length=100, blank=True)
    page = models.CharField(max_length=100, blank=True)
    page_index = models.PositiveIntegerField(default=0)
    round_number = models.PositiveIntegerField(default=0)
    answers = models.PositiveIntegerField(default=0)  # accepted field answers
    retries = models.PositiveIntegerField(default=0)  # transient retries + corrections + rejections
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    memory = models.TextField(blank=True)  # running summary (memory = summary)
    history = models.JSONField(default=list, blank=True)  # [{role, content}] (memory = history)
    state = models.JSONField(default=dict, blank=True)  # round inference, pages seen since the last answer
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["index"]
        constraints = [models.UniqueConstraint(fields=["run", "index"], name="bot_index_unique")]

    def __str__(self):
        return f"bot {self.index} ({self.participant_code}) of {self.run}"

    @property
    def cost(self) -> float:
        return (self.prompt_tokens * self.run.price_input + self.completion_tokens * self.run.price_output) / 1e6


class ModelCall(models.Model):
    class Kind(models.TextChoices):
        ANSWER = "answer", "answer"
        CORRECTION = "correction", "correction"  # after unusable output
        RESUBMIT = "resubmit", "resubmit"  # after oTree rejected the answers

    run = models.ForeignKey(BotRun, on_delete=models.CASCADE, related_name="calls")
    bot = models.ForeignKey(Bot, on_delete=models.CASCADE, related_name="calls")
    page_index = models.PositiveIntegerField(default=0)
    page = models.CharField(max_length=100, blank=True)
    kind = models.CharField(max_length=12, choices=Kind.choices, default=Kind.ANSWER)
    attempt = models.PositiveIntegerField(default=1)  # transport attempt (retries after 429 etc.)
    prompt = models.JSONField(default=list)  # the messages sent
    response = models.TextField(blank=True)
    error = models.CharField(max_length=500, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    cached = models.BooleanField(default=False)  # answered from the replay cache (no model call)
    returned_model = models.CharField(max_length=200, blank=True)
    system_fingerprint = models.CharField(max_length=200, blank=True)
    cost_usd = models.FloatField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]


class CachedReply(models.Model):
    """The replay cache: a model's reply to one request (provider, model, parameters,
    messages; `key` is their hash) and which occurrence of that request it answered, so a
    re-run gets the same reply for the n-th identical request as the published run did."""

    key = models.CharField(max_length=64)
    occurrence = models.PositiveIntegerField(default=1)
    provider_name = models.CharField(max_length=60)
    model = models.CharField(max_length=100)
    response = models.TextField()
    returned_model = models.CharField(max_length=200, blank=True)
    system_fingerprint = models.CharField(max_length=200, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    run = models.ForeignKey(BotRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["key", "occurrence"], name="cachedreply_unique")]


class Answer(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "pending"  # recorded, being submitted
        ACCEPTED = "accepted", "accepted"
        REJECTED = "rejected", "rejected"  # oTree's validation refused the submission

    run = models.ForeignKey(BotRun, on_delete=models.CASCADE, related_name="answers")
    bot = models.ForeignKey(Bot, on_delete=models.CASCADE, related_name="answer_rows")
    app = models.CharField(max_length=100)
    round_number = models.PositiveIntegerField(default=1)
    page = models.CharField(max_length=100)
    page_index = models.PositiveIntegerField()
    field = models.CharField(max_length=100)
    value = models.TextField(blank=True)
    reason = models.TextField(blank=True)
    cached = models.BooleanField(default=False)  # the model's answer came from the replay cache
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["bot", "page_index", "status"])]
