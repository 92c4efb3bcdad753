"""Realtime topics of instances: `instance:<name>` for its owner and lab managers,
`instances:all` (every instance's status) for lab managers; and the socket's followers
`follow_logs` (an instance's logs) and `follow_release` (a release's build log and status),
permission checked in instances.logstream."""

from instances import logstream
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


def _follow_logs(user, content):
    """`{"follow_logs": <name>, "component": "app"|"db"|"redis"}`: replaces the follower of that instance."""
    name, component = str(content["follow_logs"]), str(content.get("component", "app"))
    return (name, logstream.follow(user, name, component),
            lambda text: {"type": "logs", "name": name, "component": component, "text": text})


def _follow_release(user, content):
    """`{"follow_release": <name>, "number": <n>}`: a release's build log and status until it ends."""
    name = str(content["follow_release"])
    try:
        number = int(content.get("number"))
    except (TypeError, ValueError):
        raise ValueError("number must be a release number") from None
    return (f"release:{name}", logstream.follow_release(user, name, number),
            lambda snap: {"type": "release", "name": name, "number": number, **snap})


topics.register("instance", _instance_topic, _instance_snapshot)
topics.register("instances", _all_topic)
topics.register_follower("follow_logs", _follow_logs)
topics.register_follower("follow_release", _follow_release)
