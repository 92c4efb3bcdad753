"""A deployed-looking instance for lobby tests: a live release whose rooms (as the deploy's
introspection records them) are written into the database."""

from instances.models import Instance, Release

HOSTILE = 'a"&calc&'
LABELS = ["seat01", "seat02", "seat03", HOSTILE, "x/y", "Zoë 7"]


def lobby_instance(owner, name="ann-study", labels=LABELS, language="en", port=18500, number=1):
    instance = Instance.objects.filter(name=name).first() or Instance.objects.create(
        name=name, owner=owner, public_port=port, status="running")
    Release.objects.create(
        instance=instance, number=number, commit=f"{number:x}" * 40, status="live", language_code=language,
        rooms=[{"name": "lab", "display_name": "Lab room", "participant_labels": list(labels)},
               {"name": "open", "display_name": "Open room", "participant_labels": []}])
    return instance
