"""The one way to write the audit log."""

from django.core.exceptions import ImproperlyConfigured, PermissionDenied

from manager.audit.models import AuditEvent


def client_ip(request) -> str | None:
    """The client's address as the login rate limit sees it: allauth's adapter decides
    (REMOTE_ADDR; behind LAB_BEHIND_PROXY the X-Forwarded-For entry LAB_PROXY_HOPS from
    the end, see settings). An address it cannot tell is left empty, never guessed."""
    if request is None:
        return None
    from allauth.account.adapter import get_adapter

    try:
        return get_adapter(request).get_client_ip(request)
    except (PermissionDenied, ImproperlyConfigured):
        return None


def record(actor, action: str, target=None, summary: str = "", request=None, **data) -> AuditEvent:
    """Append an event. `target` is any model instance (or None); `data` must be JSON-safe
    and must never contain secrets (tokens, passwords, keys are summarised, not stored)."""
    target_type = target_id = target_repr = ""
    if target is not None:
        target_type = target._meta.model_name
        target_id = str(target.pk)
        target_repr = str(target)[:200]
    actor_obj = actor if actor is not None and getattr(actor, "is_authenticated", False) else None
    return AuditEvent.objects.create(
        actor=actor_obj,
        actor_name=actor_obj.username if actor_obj else "system",
        action=action,
        target_type=target_type,
        target_id=target_id,
        target_repr=target_repr,
        summary=summary[:300],
        data=data,
        ip=client_ip(request),
    )
