"""The kiosk's fixed texts in the instance's language (Release.language_code, oTree's
LANGUAGE_CODE). A small catalogue instead of gettext: kiosk pages speak the language of
the experiment, not of the person who runs the manager. Unknown languages fall back to
English; add a language by adding a dict with the same keys."""

TEXTS = {
    "en": {
        "welcome_title": "Welcome",
        "default_welcome": "Please take a seat and make yourself comfortable. When you are asked to, "
                           "click the button below.",
        "ready": "I am ready",
        "please_wait": "Please wait, the session will start shortly.",
        "please_wait_more": "You will be taken to the session automatically.",
        "going": "Taking you to the session…",
        "reconnecting": "Connection to the lab server lost; reconnecting…",
        "retrying": "The lab server is not reachable right now; trying again…",
        "seat": "Seat",
        "rooms_title": "Lobby",
        "choose_seat": "Choose this computer's seat",
        "no_labels": "This room has no participant labels: type this computer's seat name.",
        "seat_name": "Seat name",
        "open_seat": "Open",
        "no_rooms": "This instance has no rooms.",
        "not_found_title": "Not found",
        "not_found_hint": "Please tell the experimenter.",
        "bad_label": "A seat name has 1 to 50 characters: letters, digits, '.', '_' or '-'.",
    },
    "de": {
        "welcome_title": "Willkommen",
        "default_welcome": "Bitte nehmen Sie Platz und machen Sie es sich bequem. Wenn Sie dazu aufgefordert "
                           "werden, klicken Sie auf die Schaltfläche unten.",
        "ready": "Ich bin bereit",
        "please_wait": "Bitte warten Sie, die Sitzung beginnt in Kürze.",
        "please_wait_more": "Sie werden automatisch zur Sitzung weitergeleitet.",
        "going": "Sie werden zur Sitzung weitergeleitet…",
        "reconnecting": "Die Verbindung zum Laborserver ist unterbrochen; sie wird wiederhergestellt…",
        "retrying": "Der Laborserver ist gerade nicht erreichbar; neuer Versuch…",
        "seat": "Platz",
        "rooms_title": "Lobby",
        "choose_seat": "Platz dieses Computers wählen",
        "no_labels": "Dieser Raum hat keine Teilnehmerkennungen: Geben Sie den Platznamen dieses Computers ein.",
        "seat_name": "Platzname",
        "open_seat": "Öffnen",
        "no_rooms": "Diese Instanz hat keine Räume.",
        "not_found_title": "Nicht gefunden",
        "not_found_hint": "Bitte wenden Sie sich an die Versuchsleitung.",
        "bad_label": "Ein Platzname hat 1 bis 50 Zeichen: Buchstaben, Ziffern, '.', '_' oder '-'.",
    },
}

DEFAULT = "en"


def language(code: str | None) -> str:
    """The catalogue for oTree's LANGUAGE_CODE: "de", "de-CH", "de_AT" -> "de"; else English."""
    base = (code or "").replace("_", "-").split("-")[0].lower()
    return base if base in TEXTS else DEFAULT


def texts(code: str | None) -> dict[str, str]:
    return TEXTS[language(code)]
