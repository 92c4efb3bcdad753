"""What the JSON API reads and writes.

Input schemas are strict: unknown fields are refused (a typo such as `is_admin` is
reported instead of being silently ignored) and nothing is coerced (`"production": 0`,
`"memory_mb": "512"` are 422; a JSON integer is still a number, `"cpus": 1`).

Every rule the services enforce is *stated* in the OpenAPI document (`rules()`: ranges,
patterns, enums, lengths, taken from the services' own constants), but *checked* only
once, in the services: so the API answers with the same specific message as the web form
("name: The name contains a NUL character."), never with a pydantic paraphrase.
"""

from datetime import datetime
from typing import Annotated

from django.contrib.auth.validators import UnicodeUsernameValidator
from ninja import Schema
from pydantic import BeforeValidator, ConfigDict, Field

from manager.accounts.models import SSHKey, User
from manager.accounts.services import MAX_BOT_BUDGET, MAX_SSH_KEY
from manager.accounts.sshkeys import ACCEPTED_TYPES

# What `manager.texts` lets through, as JSON Schema patterns (tests/manager/test_api_schema.py
# compares them with `manager.texts.problem` character by character): any text holds no
# NUL; a single-line text (names, titles, passwords) no control character or line break.
# A lone surrogate (a JSON "\ud800" escape) is refused too; a pattern cannot say so.
TEXT = r"^[^\x00]*$"
SINGLE_LINE = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
# The largest id or number a path takes (the database's integer columns hold no more).
MAX_ID = 2**31 - 1


def _whole(value):
    """JSON Schema's "integer" holds 512.0 too: take a float without a fraction as the whole
    number it is (a bool, a string or 512.5 stay what they are: refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# A whole number, as JSON Schema's "integer" means it (512 or 512.0; never "512" or true).
Whole = Annotated[int, BeforeValidator(_whole)]


def rules(**keywords) -> dict:
    """JSON-Schema keywords (`min_length` → `minLength`) that the services enforce, for the
    OpenAPI document only: `Field(**rules(maxLength=…))`. For an optional field they sit
    beside its `anyOf`, where they apply to its non-null values."""
    return {"json_schema_extra": {_camel(key): value for key, value in keywords.items()}}


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(word.title() for word in rest)


def text(*, max_length: int | None = None, min_length: int | None = None, single_line: bool = False,
         **more) -> dict:
    """`rules()` of a text the services check with `manager.texts.check_text`."""
    keywords = {"pattern": SINGLE_LINE if single_line else TEXT, **more}
    if max_length is not None:
        keywords["max_length"] = max_length
    if min_length is not None:
        keywords["min_length"] = min_length
    return rules(**keywords)


def column(model, field: str) -> int:
    """The max_length of a model's column (what the database holds), for `text()`/`rules()`."""
    return model._meta.get_field(field).max_length


class Error(Schema):
    """Every error the API returns: one human-readable sentence (or a few)."""

    detail: str = Field(examples=["email: 'x' is not a valid e-mail address."])


class InputSchema(Schema):
    model_config = ConfigDict(extra="forbid", strict=True)


# --- users ----------------------------------------------------------------------------

class UserOut(Schema):
    id: int
    username: str
    email: str
    name: str
    is_superuser: bool = Field(description="Lab managers are superusers; everyone else is an experimenter.")
    is_active: bool
    date_joined: datetime
    last_login: datetime | None
    bot_monthly_budget_usd: float | None = Field(description="what the account's bot runs may spend per calendar "
                                                 "month (USD); null: the lab's default (LAB_BOT_MONTHLY_BUDGET_USD)")


USERNAME = UnicodeUsernameValidator.regex.replace(r"\Z", "$")  # Python's \w: Unicode letters and digits


class UserIn(InputSchema):
    username: str = Field(description="Letters, digits and @ . + - _; unique ignoring case (409 when taken).",
                          **rules(pattern=USERNAME, min_length=1, max_length=column(User, "username")))
    email: str = Field(description="The invitation to set a password is sent here; unique ignoring case "
                       "(409 when taken).", **rules(format="email", max_length=column(User, "email")))
    name: str = Field("", description="Full name (optional).", **text(max_length=column(User, "name"),
                                                                      single_line=True))
    is_superuser: bool = Field(False, description="Make the new account a lab manager.")


class UserBudgetIn(InputSchema):
    bot_monthly_budget_usd: float | None = Field(description="USD per calendar month (UTC), >= 0; null: the lab's "
                                                 "default", **rules(minimum=0, maximum=MAX_BOT_BUDGET))


# --- SSH keys -------------------------------------------------------------------------

class SSHKeyOut(Schema):
    id: int
    title: str
    key_type: str = Field(examples=["ssh-ed25519"])
    bits: int
    fingerprint: str = Field(description="As `ssh-keygen -lf key.pub` prints it.", examples=["SHA256:…"])
    created_at: datetime
    last_used_at: datetime | None


SSH_KEY = r"^\s*(" + "|".join(sorted(ACCEPTED_TYPES)) + r") [A-Za-z0-9+/]+={0,2}( [^\n\x00]*)?\s*$"


class SSHKeyIn(InputSchema):
    title: str = Field("", description="Defaults to the key's comment.",
                       **text(max_length=column(SSHKey, "title"), single_line=True))
    key: str = Field(
        description="One public key in OpenSSH format (the contents of a .pub file): ssh-ed25519, "
        "ecdsa-sha2-nistp256/384/521, or ssh-rsa with at least 2048 bits. A key that does not decode, "
        "is weak or private is 422; a key already on an account is 409.",
        **rules(pattern=SSH_KEY, max_length=MAX_SSH_KEY),
    )
