"""What the JSON API reads and writes.

Input schemas forbid unknown fields, so a typo such as `is_admin` is reported instead of
being silently ignored. Length limits here only mirror the database columns (and appear
in the OpenAPI document); every other rule lives in `manager.accounts.services`.
"""

from datetime import datetime

from ninja import Schema
from pydantic import ConfigDict, Field


class Error(Schema):
    """Every error the API returns: one human-readable sentence (or a few)."""

    detail: str = Field(examples=["email: 'x' is not a valid e-mail address."])


class InputSchema(Schema):
    model_config = ConfigDict(extra="forbid")


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


class UserIn(InputSchema):
    username: str = Field(max_length=150, description="Letters, digits and @ . + - _; unique ignoring case.")
    email: str = Field(max_length=254, description="The invitation to set a password is sent here.")
    name: str = Field("", max_length=150, description="Full name (optional).")
    is_superuser: bool = Field(False, description="Make the new account a lab manager.")


# --- SSH keys -------------------------------------------------------------------------

class SSHKeyOut(Schema):
    id: int
    title: str
    key_type: str = Field(examples=["ssh-ed25519"])
    bits: int
    fingerprint: str = Field(description="As `ssh-keygen -lf key.pub` prints it.", examples=["SHA256:…"])
    created_at: datetime
    last_used_at: datetime | None


class SSHKeyIn(InputSchema):
    title: str = Field("", max_length=100, description="Defaults to the key's comment.")
    key: str = Field(
        max_length=16000,
        description="One public key in OpenSSH format (the contents of a .pub file): ssh-ed25519, "
        "ecdsa-sha2-nistp256/384/521, or ssh-rsa with at least 2048 bits.",
    )
