from django import forms

from instances.models import Instance
from manager.accounts.forms import ServiceForm
from manager.accounts.models import User


class InstanceCreateForm(ServiceForm):
    name = forms.CharField(max_length=40, help_text="2–40 characters: lowercase letters, digits, hyphens. "
                           "Part of the instance's URL and git remote; cannot be changed later.",
                           widget=forms.TextInput(attrs={"placeholder": "public-goods", "autocomplete": "off"}))
    owner = forms.ModelChoiceField(queryset=User.objects.filter(is_active=True).order_by("username"),
                                   help_text="The experimenter who deploys to and manages this instance.")


class SettingsForm(ServiceForm):
    auth_level = forms.ChoiceField(label="Auth level", choices=Instance.AuthLevel.choices, required=False)
    production = forms.BooleanField(label="Production mode (OTREE_PRODUCTION=1: no debug pages)", required=False)
    env = forms.CharField(label="Config vars", required=False, strip=False, widget=forms.Textarea(attrs={
        "rows": 5, "class": "font-monospace", "spellcheck": "false", "placeholder": "SENTRY_DSN=https://...\nLAB_ROOM=econ-lab"}),
        help_text="One NAME=value per line; set as environment variables of the oTree app.")

    def clean_env(self):
        """NAME=value lines into a dict the service checks. The name is everything before the
        '=', exactly as the API takes it (never trimmed: `X =1` is refused as the API refuses
        "X ", with the same sentence); spaces and tabs around the value are layout. A name
        set on two lines is refused, never merged."""
        values, lines = {}, {}
        for number, line in enumerate(self.cleaned_data["env"].splitlines(), 1):
            if not line.strip(" \t") or line.strip(" \t").startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise forms.ValidationError(f"Line {number} has no '=': write NAME=value.")
            if key in lines:
                raise forms.ValidationError(f"Line {number} sets {key} again (line {lines[key]} set it already).")
            lines[key] = number
            values[key] = value.strip(" \t")
        return values


class AdminPasswordForm(ServiceForm):
    password = forms.CharField(required=False, max_length=128, strip=False,  # as typed: the service checks it
                               widget=forms.PasswordInput(render_value=False),
                               help_text="Leave empty to generate a strong password.")


class LimitsForm(ServiceForm):
    # Ranges and decimals are the service's rules (the page says what the API says).
    memory_mb = forms.IntegerField(label="Memory (MiB)")
    cpus = forms.DecimalField(label="CPUs")


class SleepForm(ServiceForm):
    # Empty = the lab's default (LAB_SLEEP_AFTER_MINUTES); the range is the service's (instances.sleep).
    sleep_after_minutes = forms.IntegerField(required=False)

    def __init__(self, *args, **kwargs):
        from django.conf import settings

        super().__init__(*args, **kwargs)
        self.fields["sleep_after_minutes"].label = (
            f"Sleep after (minutes, 0 = never, empty = lab default {settings.LAB_SLEEP_AFTER_MINUTES})")


class TransferForm(ServiceForm):
    owner = forms.ModelChoiceField(label="New owner", queryset=User.objects.filter(is_active=True).order_by("username"))


class MoveForm(ServiceForm):
    # The node's id, checked by the service (a node that does not exist, is not ready or
    # active, or is the instance's own gets the API's sentence).
    node = forms.CharField(label="Move to node", required=False, strip=False)


class BackupScheduleForm(ServiceForm):
    # Empty = the lab's default (LAB_BACKUP_*); the ranges are the service's (instances.schedule).
    backup_interval_minutes = forms.IntegerField(label="Every (minutes; 0 = off)", required=False)
    backup_keep_daily = forms.IntegerField(label="Keep daily", required=False)
    backup_keep_weekly = forms.IntegerField(label="Keep weekly", required=False)


class BackupUploadForm(ServiceForm):
    # Checked by the service (its first bytes, the instance's database, the size while it arrives).
    file = forms.FileField(label="Backup file", required=False,
                           help_text="A pg_dump -Fc archive (PostgreSQL instances) or an SQLite database file "
                                     "(SQLite instances), made elsewhere.")


class BackupUploadAnyForm(BackupUploadForm):
    instance = forms.ModelChoiceField(label="Instance", queryset=Instance.objects.order_by("name"),
                                      to_field_name="name")


class RestoreNewForm(ServiceForm):
    name = forms.CharField(max_length=40, label="New instance's name",
                           widget=forms.TextInput(attrs={"placeholder": "public-goods-copy", "autocomplete": "off"}))
    owner = forms.ModelChoiceField(queryset=User.objects.filter(is_active=True).order_by("username"))


class RestoreIntoForm(ServiceForm):
    instance = forms.ModelChoiceField(label="Into the instance", queryset=Instance.objects.order_by("name"),
                                      to_field_name="name")
