import hashlib
import secrets

from django.contrib.auth.models import AbstractUser, UserManager
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone


class LabUserManager(UserManager):
    def get_by_natural_key(self, username):
        return self.get(username__iexact=username)


class User(AbstractUser):
    """A lab member. Superusers are lab managers; everyone else is an experimenter."""

    # One "name" field instead of first/last: labs are international.
    first_name = None
    last_name = None
    name = models.CharField("full name", max_length=150, blank=True)
    email = models.EmailField("e-mail address", max_length=254)
    must_change_password = models.BooleanField(
        default=False, help_text="Set for generated one-time passwords; cleared when the user picks their own."
    )

    # LLM bots: USD this experimenter's bot runs may spend per calendar month (UTC); None:
    # the lab's default (LAB_BOT_MONTHLY_BUDGET_USD; empty = no cap). Set by lab managers.
    bot_monthly_budget_usd = models.FloatField(null=True, blank=True)

    objects = LabUserManager()

    REQUIRED_FIELDS = ["email"]

    class Meta:
        ordering = ["username"]
        constraints = [
            models.UniqueConstraint(Lower("username"), name="user_username_ci_unique"),
            models.UniqueConstraint(Lower("email"), name="user_email_ci_unique"),
        ]

    def __str__(self):
        return self.username

    def get_full_name(self):
        return self.name or self.username

    def get_short_name(self):
        return self.name.split(" ")[0] if self.name else self.username

    @property
    def display_name(self):
        return self.name or self.username

    @property
    def role(self):
        return "Lab manager" if self.is_superuser else "Experimenter"


class SSHKey(models.Model):
    """A public key a user deploys with (git over SSH)."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="ssh_keys")
    title = models.CharField(max_length=100)
    key_type = models.CharField(max_length=40)  # e.g. ssh-ed25519
    public_key = models.TextField()  # normalised "type base64" (comment dropped)
    bits = models.PositiveIntegerField()
    fingerprint = models.CharField(max_length=100, unique=True)  # SHA256:...
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name = "SSH key"

    def __str__(self):
        return f"{self.title} ({self.fingerprint})"


TOKEN_PREFIX = "olm_"


def hash_token(raw: str) -> str:
    # Tokens are 256 random bits: a plain SHA-256 is enough (no dictionary to guess from).
    return hashlib.sha256(raw.encode()).hexdigest()


class AccessToken(models.Model):
    """A personal access token for the JSON API and HTTPS git. Only its hash is stored."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="access_tokens")
    name = models.CharField(max_length=100)
    token_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=16)  # first characters, to tell tokens apart
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

    @staticmethod
    def generate() -> str:
        return TOKEN_PREFIX + secrets.token_urlsafe(32)
