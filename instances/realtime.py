"""Realtime topics of instances: `instance:<name>` for its owner and lab managers,
`instances:all` (every instance's status) for lab managers."""

from instances.selectors import visible_instances
from instances.state import ALL_GROUP, instance_group, state_event
from manager.realtime import topics


def _instance_topic(user, name):
    instance = visible_instances(user).filter(name=name).first()
    return instance_group(instance.pk) if instance else None


def _instance_snapshot(user, name):
    instance = visible_instances(user).filter(name=name).first()
    return state_event(instance) if instance else None


def _all_topic(user, key):
    return ALL_GROUP if key == "all" and user.is_superuser else None


topics.register("instance", _instance_topic, _instance_snapshot)
topics.register("instances", _all_topic)
