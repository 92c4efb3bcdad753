from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import MaxLengthValidator, ProhibitNullCharactersValidator

from manager.throttle import Throttled


class ServiceForm(forms.Form):
    """A form whose save() calls a service; the service's ValidationErrors (field-keyed)
    are shown on the fields, so every rule is written once, in the service. A rate limit
    (`Throttled`) is shown as the form's error and kept as `throttled` (the page answers 429)."""

    throttled = None
    confirm = None  # a refusal the user may override (e.g. a live oTree session): ask, then send force


    def __init__(self, *args, **kwargs):
        # Text fields leave NUL characters and lengths to the service (manager.texts), so
        # the page says what the API says ("… contains a NUL character.", "… is too long
        # (…)"); a field's max_length still becomes its input's maxlength attribute.
        super().__init__(*args, **kwargs)
        for field in self.fields.values():
            if isinstance(field, forms.CharField):
                field.validators = [v for v in field.validators
                                    if not isinstance(v, (ProhibitNullCharactersValidator, MaxLengthValidator))]

    def run(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Throttled as exc:
            self.throttled = exc
            self.add_error(None, exc.detail)
            return None
        except ValidationError as exc:
            if getattr(exc, "needs_confirmation", False):
                self.confirm = exc
                self.add_error(None, getattr(exc, "page_text", None) or exc.messages)
                return None
            if hasattr(exc, "error_dict"):
                for field, errors in exc.message_dict.items():
                    self.add_error(field if field in self.fields else None, errors)
            else:
                self.add_error(None, exc.messages)
            return None


class UserForm(ServiceForm):
    name = forms.CharField(label="Full name", max_length=150, required=False,
                           widget=forms.TextInput(attrs={"autocomplete": "off", "placeholder": "Ada Lovelace"}))
    username = forms.CharField(max_length=150, help_text="Letters, digits and @ . + - _ only.",
                               widget=forms.TextInput(attrs={"autocomplete": "off", "placeholder": "ada"}))
    email = forms.CharField(label="E-mail", max_length=254,  # checked by the service (the API's words)
                            widget=forms.EmailInput(attrs={"placeholder": "ada@university.edu"}))


class UserEditForm(UserForm):
    bot_monthly_budget_usd = forms.FloatField(
        label="Monthly bot budget (USD)", required=False, min_value=0,
        help_text="What this account's bot runs may spend on model calls per calendar month (UTC); "
                  "empty: the lab's default (LAB_BOT_MONTHLY_BUDGET_USD).")


class UserCreateForm(UserForm):
    is_superuser = forms.BooleanField(label="Lab manager (superuser)", required=False,
                                      help_text="Lab managers manage accounts and see every instance.")


class SSHKeyForm(ServiceForm):
    title = forms.CharField(max_length=100, required=False, help_text="E.g. “Work laptop”. Defaults to the key's comment.")
    key = forms.CharField(label="Public key", widget=forms.Textarea(attrs={
        "rows": 4, "class": "font-monospace", "spellcheck": "false",
        "placeholder": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA… you@laptop"}),
        help_text="The contents of your .pub file, e.g. ~/.ssh/id_ed25519.pub. "
                  "Accepted: ed25519, ecdsa, and RSA with at least 2048 bits.")


class TokenForm(ServiceForm):
    name = forms.CharField(max_length=100, help_text="What the token is for, e.g. “laptop git push” or “analysis script”.")


class ProfileForm(ServiceForm):
    name = forms.CharField(label="Full name", max_length=150, required=False)
