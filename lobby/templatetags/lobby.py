from django import template

from lobby import services
from lobby import texts as catalogue

register = template.Library()


@register.inclusion_tag("lobby/_board.html", takes_context=True)
def lobby_board(context, instance):
    """The lobby card of the instance page (a page only its owner and lab managers see)."""
    rooms, language = services.live_rooms(instance)
    return {
        "instance": instance,
        "rooms": services.board(instance) if rooms else [],
        "lobby_url": services.lobby_url(instance.name),
        "language": catalogue.language(language),
        "language_code": language,
        "welcome_text": services.lobby_settings(instance).welcome_text,
        "default_welcome": catalogue.texts(language)["default_welcome"],
        "csrf_token": context.get("csrf_token"),
        "user": context.get("user"),
    }


@register.simple_tag
def seat_path(instance_name, room, label):
    """The kiosk page of a seat (room and label percent-encoded)."""
    return services.lobby_path(instance_name, room, label)
