from django import forms
from django.core.exceptions import ValidationError


class ServiceForm(forms.Form):
    """A form whose save() calls a service; the service's ValidationErrors (field-keyed)
    are shown on the fields, so every rule is written once, in the service."""

    def run(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
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
    email = forms.EmailField(label="E-mail", max_length=254,
                             widget=forms.EmailInput(attrs={"placeholder": "ada@university.edu"}))


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
