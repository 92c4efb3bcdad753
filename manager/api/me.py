"""/api/v1/me: the caller's own account and SSH (deploy) keys."""

from django.core.exceptions import ValidationError
from django.http import HttpRequest
from ninja import Path, Router, Status
from ninja.errors import HttpError

from manager.accounts import services
from manager.accounts.models import SSHKey
from manager.api.errors import responses
from manager.api.schemas import MAX_ID, SSHKeyIn, SSHKeyOut, UserOut

router = Router(tags=["me"])


@router.get("", summary="Your account", response=responses({200: UserOut}))
def get_me(request: HttpRequest):
    """The account the token belongs to."""
    return request.auth


@router.get("/ssh-keys", summary="Your SSH keys", response=responses({200: list[SSHKeyOut]}))
def list_my_ssh_keys(request: HttpRequest):
    """The caller's SSH keys (for git push over SSH), oldest first."""
    return SSHKey.objects.filter(user=request.auth).order_by("created_at", "id")


@router.post("/ssh-keys", summary="Add an SSH key", response=responses({201: SSHKeyOut}, 400, 409, 422))
def add_my_ssh_key(request: HttpRequest, payload: SSHKeyIn):
    """Add a public key. Weak, damaged or private keys are refused (422); a key already
    on this or another account is a conflict (409)."""
    try:
        key = services.add_ssh_key(request.auth, title=payload.title, key=payload.key, request=request)
    except ValidationError as exc:
        if hasattr(exc, "error_dict"):
            raise
        raise ValidationError({"key": exc.messages}) from None  # name the field
    return Status(201, key)


@router.delete(
    "/ssh-keys/{key_id}", summary="Remove one of your SSH keys", response=responses({204: None}, 404, 422)
)
def delete_my_ssh_key(request: HttpRequest, key_id: int = Path(..., ge=1, le=MAX_ID)):
    """Remove one of the caller's keys. Other people's keys are not visible (404)."""
    key = SSHKey.objects.filter(pk=key_id, user=request.auth).first()
    if key is None:
        raise HttpError(404, f"You have no SSH key with id {key_id}.")
    services.remove_ssh_key(request.auth, key, request=request)
    return Status(204, None)
