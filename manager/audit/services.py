"""The one way to write the audit log."""

from manager.audit.models import AuditEvent


def client_ip(request) -> str | None:
    return request.META.get("REMOTE_ADDR") if request is not None else None


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
