"""Secrets at rest: Fernet (AES-128-CBC + HMAC) with the key in LAB_DATA_DIR/secrets/."""

import json

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.db import models


def _fernet() -> Fernet:
    return Fernet(settings.LAB_ENCRYPTION_KEY.encode())


def encrypt(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise ValueError("cannot decrypt a stored secret: was LAB_DATA_DIR/secrets/encryption.key replaced?") from None


class EncryptedTextField(models.TextField):
    """A text column stored encrypted; Python code sees plain text."""

    def from_db_value(self, value, expression, connection):
        return value if value in (None, "") else decrypt(value)

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        return value if value in (None, "") else encrypt(value)


class EncryptedJSONField(models.TextField):
    """A JSON object (e.g. config vars) stored encrypted."""

    def from_db_value(self, value, expression, connection):
        return {} if value in (None, "") else json.loads(decrypt(value))

    def to_python(self, value):
        if isinstance(value, dict):
            return value
        return {} if value in (None, "") else json.loads(value)

    def get_prep_value(self, value):
        return encrypt(json.dumps(value or {}, sort_keys=True))
