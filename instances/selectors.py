"""Who sees which instance: the owner and lab managers. Everyone else gets 404 (an
instance's existence is not revealed to other experimenters)."""

from django.http import Http404

from django.db.models import Max, Prefetch

from instances.models import Instance, Release
from manager.texts import problem


def visible_instances(user):
    if not user.is_authenticated or not user.is_active:
        return Instance.objects.none()
    qs = Instance.objects.select_related("owner")
    return qs if user.is_superuser else qs.filter(owner=user)


def get_visible_instance(user, name: str) -> Instance:
    if problem(name, max_length=200, single_line=True):  # no instance has it; PostgreSQL could not compare it
        raise Http404("There is no instance with such a name.")
    instance = visible_instances(user).filter(name=name).first()
    if instance is None:
        raise Http404(f"There is no instance named {name!r} that you may see.")
    return instance


def can_see(user, instance: Instance) -> bool:
    return user.is_active and (user.is_superuser or instance.owner_id == user.pk)


def with_live_release(instances):
    """Fetch each instance's live release along (for `Instance.live_release`) in one query."""
    return instances.prefetch_related(
        Prefetch("releases", queryset=Release.objects.filter(status=Release.Status.LIVE), to_attr="live_releases"))


def next_number(instance: Instance, model) -> int:
    """The next per-instance number of `model` (releases, bot runs: 1, 2, 3 ...); call it
    in the transaction that creates the row. The instance's row is locked meanwhile, so two
    creations never take the same number (PostgreSQL; SQLite serializes writes anyway)."""
    Instance.objects.select_for_update().filter(pk=instance.pk).first()
    return (model.objects.filter(instance=instance).aggregate(n=Max("number"))["n"] or 0) + 1


def visible_backups(user):
    """Backups `user` may see and restore: lab managers all; an experimenter those of their
    instances and those made while an instance was theirs (a deleted one's included)."""
    from django.db.models import Q

    from instances.models import Backup

    if not user.is_authenticated or not user.is_active:
        return Backup.objects.none()
    qs = Backup.objects.select_related("instance", "owner")
    return qs if user.is_superuser else qs.filter(Q(owner=user) | Q(instance__owner=user))


def get_visible_backup(user, backup_id) -> "Backup":  # noqa: F821
    try:
        backup_id = int(backup_id)
    except (TypeError, ValueError):
        raise Http404("There is no such backup.") from None
    backup = visible_backups(user).filter(pk=backup_id).first()
    if backup is None:
        raise Http404(f"There is no backup {backup_id} that you may see.")
    return backup
