"""Parsing and checking SSH public keys (OpenSSH one-line format)."""

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from django.core.exceptions import ValidationError

ACCEPTED_TYPES = {
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
}
MIN_RSA_BITS = 2048
ACCEPTED_HELP = "Accepted: ssh-ed25519, ecdsa-sha2-nistp256/384/521, and ssh-rsa with at least 2048 bits."


@dataclass(frozen=True)
class ParsedKey:
    key_type: str
    public_key: str  # "type base64", without comment
    bits: int
    fingerprint: str  # "SHA256:..." as ssh-keygen -l prints it
    comment: str


def fingerprint_of(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _blob_type(blob: bytes) -> str | None:
    if len(blob) < 4:
        return None
    (length,) = struct.unpack(">I", blob[:4])
    if length > 64 or len(blob) < 4 + length:
        return None
    try:
        return blob[4 : 4 + length].decode("ascii")
    except UnicodeDecodeError:
        return None


def parse_public_key(text: str) -> ParsedKey:
    """Return the parsed key or raise ValidationError with a message a user can act on."""
    text = (text or "").strip()
    if not text:
        raise ValidationError("Paste a public key (the contents of a .pub file).", code="empty")
    if "PRIVATE KEY" in text:
        raise ValidationError(
            "This is a private key. Never share it: paste the public key instead (the file ending in .pub).",
            code="private",
        )
    if "BEGIN SSH2 PUBLIC KEY" in text or "BEGIN PUBLIC KEY" in text:
        raise ValidationError(
            "This key is in PEM/RFC4716 format. Paste it in OpenSSH format (one line starting with "
            "ssh-ed25519, ecdsa-sha2-… or ssh-rsa), e.g. from `ssh-keygen -i -f key.pub`.",
            code="format",
        )
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        raise ValidationError("Paste one key at a time (the text has several lines).", code="multiple")
    parts = lines[0].split(None, 2)
    key_type = parts[0]
    if key_type not in ACCEPTED_TYPES:
        if key_type == "ssh-dss":
            raise ValidationError("DSA keys are insecure and not accepted. " + ACCEPTED_HELP, code="type")
        if key_type.startswith("sk-"):
            raise ValidationError("Security-key (FIDO) SSH keys are not supported yet. " + ACCEPTED_HELP, code="type")
        raise ValidationError(
            f"Not an SSH public key: it should start with its type. {ACCEPTED_HELP}", code="type"
        )
    if len(parts) < 2:
        raise ValidationError("The key data is missing after the key type.", code="format")
    b64 = parts[1]
    comment = parts[2].strip() if len(parts) > 2 else ""
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("The key data is not valid base64: was it copied completely?", code="base64") from None
    if _blob_type(blob) != key_type:
        raise ValidationError(
            f"The key data does not match its type {key_type}: was it copied completely?", code="mismatch"
        )
    try:
        key = load_ssh_public_key(f"{key_type} {b64}".encode())
    except (ValueError, UnsupportedAlgorithm):
        raise ValidationError("The key data is damaged: was it copied completely?", code="invalid") from None
    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        if bits < MIN_RSA_BITS:
            raise ValidationError(
                f"This RSA key has only {bits} bits; at least {MIN_RSA_BITS} are required. "
                "Create a new key with `ssh-keygen -t ed25519`.",
                code="weak",
            )
    elif isinstance(key, ec.EllipticCurvePublicKey):
        bits = key.curve.key_size
    elif isinstance(key, ed25519.Ed25519PublicKey):
        bits = 256
    else:  # pragma: no cover - ACCEPTED_TYPES keeps other kinds out
        raise ValidationError("Unsupported key type. " + ACCEPTED_HELP, code="type")
    return ParsedKey(
        key_type=key_type,
        public_key=f"{key_type} {base64.b64encode(blob).decode()}",  # canonical (e.g. no extra padding)
        bits=bits,
        fingerprint=fingerprint_of(blob),
        comment=comment[:100],
    )
