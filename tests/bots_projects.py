"""The oTree 6 project the bot-run tests and the benchmark deploy: a guessing game with
wait pages (groups of 3, 3 rounds; a room "lab" with 3 participant labels), the same game with the whole session as one group (for
50 bots), and a survey with every kind of form field the page reader knows (text,
integer, float, select, radio, checkbox, button choices) and server-side validation.

And a hostile bit, as tenant code may have it: settings.py wraps oTree's ASGI app (before
uvicorn loads it) so that, when the config var ESCAPE_TO is set, the first participant to
open a page of the app "escape" is redirected to ESCAPE_TO — outside the instance."""

from tests import otree_projects
from tests.otree_projects import OTREE_REQUIREMENT

SETTINGS = '''\
from os import environ

SESSION_CONFIGS = [
    dict(name="guess", display_name="Guess 2/3 of the average", app_sequence=["guess"],
         num_demo_participants=3),
    dict(name="guess_survey", display_name="Guessing game, then a survey", app_sequence=["guess", "survey"],
         num_demo_participants=3),
    dict(name="crowd", display_name="Guess 2/3 of the average, whole session", app_sequence=["crowd"],
         num_demo_participants=5),
    dict(name="survey", display_name="The survey alone", app_sequence=["survey"], num_demo_participants=1),
    dict(name="escape", display_name="A page that redirects out, then the survey", app_sequence=["escape", "survey"],
         num_demo_participants=3),
    dict(name="checks", display_name="A plain page, a live page, a field set by JavaScript", app_sequence=["checks"],
         num_demo_participants=2),
]
SESSION_CONFIG_DEFAULTS = dict(real_world_currency_per_point=1.00, participation_fee=0.00, doc="")
PARTICIPANT_FIELDS = []
SESSION_FIELDS = []
LANGUAGE_CODE = "en"
REAL_WORLD_CURRENCY_CODE = "USD"
USE_POINTS = True
ROOMS = [dict(name="lab", display_name="Lab room", participant_label_file="_rooms/lab.txt")]
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = environ.get("OTREE_ADMIN_PASSWORD")
DEMO_PAGE_INTRO_HTML = ""
SECRET_KEY = "not-a-secret-test-key"

# Tenant code can wrap oTree's app: uvicorn imports "otree.asgi:app" after this file ran.
ESCAPE_TO = environ.get("ESCAPE_TO", "")
if ESCAPE_TO:
    import uvicorn.config

    _import_app = uvicorn.config.import_from_string
    _escaped = []

    def _escaping(app):
        async def wrapper(scope, receive, send):
            parts = scope.get("path", "").split("/") if scope["type"] == "http" else []
            if len(parts) > 3 and parts[1] == "p" and parts[3] == "escape" and parts[2] in (_escaped or [parts[2]]):
                _escaped[:] = [parts[2]]
                await send({"type": "http.response.start", "status": 302,
                            "headers": [(b"location", (ESCAPE_TO + "secret-page").encode())]})
                await send({"type": "http.response.body", "body": b""})
                return
            await app(scope, receive, send)
        return wrapper

    def _import(name):
        found = _import_app(name)
        return _escaping(found) if name == "otree.asgi:app" else found

    uvicorn.config.import_from_string = _import
'''

GAME = '''\
from otree.api import *

doc = "Guess two thirds of the average guess."


class C(BaseConstants):
    NAME_IN_URL = "NAME_IN_URL_VALUE"
    PLAYERS_PER_GROUP = PLAYERS_VALUE
    NUM_ROUNDS = 3


class Subsession(BaseSubsession):
    pass


class Group(BaseGroup):
    target = models.FloatField()


class Player(BasePlayer):
    guess = models.IntegerField(min=0, max=100, label="Your guess (a whole number from 0 to 100)")


def set_target(group: Group):
    guesses = [p.guess for p in group.get_players()]
    group.target = round(2 / 3 * sum(guesses) / len(guesses), 2)
    best = min(abs(g - group.target) for g in guesses)
    for p in group.get_players():
        p.payoff = 100 if abs(p.guess - group.target) == best else 0


class Guess(Page):
    form_model = "player"
    form_fields = ["guess"]

    @staticmethod
    def error_message(player, values):
        if values["guess"] == 50:
            return "50 is not allowed in this game: choose another number."


class ResultsWaitPage(WaitPage):
    after_all_players_arrive = set_target


class Results(Page):
    pass


page_sequence = [Guess, ResultsWaitPage, Results]
'''

GUESS_HTML = '''\
{{ block title }}Round {{ player.round_number }} of {{ C.NUM_ROUNDS }}{{ endblock }}
{{ block content }}
<p>Everyone in your group guesses a number from 0 to 100. The guess closest to two thirds
of the average guess wins 100 points.</p>
{{ formfields }}
{{ next_button }}
{{ endblock }}
'''

RESULTS_HTML = '''\
{{ block title }}Results of round {{ player.round_number }}{{ endblock }}
{{ block content }}
<p>You guessed {{ player.guess }}. Two thirds of the average was {{ group.target }}.
You earn {{ player.payoff }}.</p>
{{ next_button }}
{{ endblock }}
'''

# oTree's app skeleton (constants, subsession, group) from the deploy tests' app, then the survey.
SURVEY = otree_projects.APP.split("class Player(BasePlayer):")[0].replace('"hello"', '"survey"') + '''\
class Player(BasePlayer):
    nickname = models.StringField(label="A nickname")
    age = models.IntegerField(min=16, max=99, label="Your age")
    height = models.FloatField(min=1.0, max=2.5, label="Your height in metres")
    colour = models.StringField(choices=["red", "green", "blue"], label="Favourite colour")
    fairness = models.IntegerField(choices=[[1, "Unfair"], [2, "Neutral"], [3, "Fair"]],
                                   widget=widgets.RadioSelect, label="Was the game fair?")
    newsletter = models.BooleanField(widget=widgets.CheckboxInput, blank=True, label="Send me the results")
    again = models.BooleanField(label="Would you play again?")


class Survey(Page):
    form_model = "player"
    form_fields = ["nickname", "age", "height", "colour", "fairness", "newsletter"]


class Again(Page):
    form_model = "player"
    form_fields = ["again"]


page_sequence = [Survey, Again]
'''

SURVEY_HTML = '''\
{{ block title }}A short survey{{ endblock }}
{{ block content }}
{{ formfields }}
{{ next_button }}
{{ endblock }}
'''

ESCAPE = otree_projects.APP.split("class Player(BasePlayer):")[0].replace('"hello"', '"escape"') + '''\
class Player(BasePlayer):
    pass


class Leave(Page):
    pass


page_sequence = [Leave]
'''

LEAVE_HTML = '''\
{{ block title }}Before the survey{{ endblock }}
{{ block content }}
<p>Thank you. A short survey follows.</p>
{{ next_button }}
{{ endblock }}
'''

AGAIN_HTML = '''\
{{ block title }}One last question{{ endblock }}
{{ block content }}
<p>Would you play again?</p>
<button name="again" value="True" class="btn btn-primary">Yes</button>
<button name="again" value="False" class="btn btn-secondary">No</button>
{{ formfield_errors 'again' }}
{{ endblock }}
'''


ROOM_LABELS = ["seat01", "seat02", "seat03"]  # the room "lab" (the lobby's bot seats)

# For preflight: a plain page, a live page (live_method, liveSend) and a slider whose value a
# script copies into a hidden input (the IntegerField `slider`: bots cannot answer it).
CHECKS = otree_projects.APP.split("class Player(BasePlayer):")[0].replace('"hello"', '"checks"') + '''\
class Player(BasePlayer):
    slider = models.IntegerField(min=0, max=100)


class Intro(Page):
    timeout_seconds = 600  # oTree's timer script adds an input when the time is up: not a problem


class Chat(Page):
    @staticmethod
    def live_method(player, data):
        return {player.id_in_group: data}


class Slide(Page):
    form_model = "player"
    form_fields = ["slider"]


page_sequence = [Intro, Chat, Slide]
'''

INTRO_HTML = '''\
{{ block title }}Welcome{{ endblock }}
{{ block content }}
<p>Two short tasks follow.</p>
{{ next_button }}
{{ endblock }}
'''

CHAT_HTML = '''\
{{ block title }}Say hello{{ endblock }}
{{ block content }}
<p>Say hello to the others.</p>
<button type="button" id="hello" onclick="liveSend('hello')">Say hello</button>
<script>function liveRecv(data) { document.getElementById("hello").textContent = "said"; }</script>
{{ next_button }}
{{ endblock }}
'''

SLIDE_HTML = '''\
{{ block title }}Move the slider{{ endblock }}
{{ block content }}
<p>How much do you agree? Move the slider.</p>
<input type="range" id="slider-ui" min="0" max="100" value="50">
<input type="hidden" name="slider" id="id_slider">
<script>
  document.getElementById("slider-ui").addEventListener("input", function (e) {
    document.getElementById("id_slider").value = e.target.value;
  });
</script>
{{ next_button }}
{{ endblock }}
'''


def game(name_in_url: str, players: str) -> str:
    return GAME.replace("NAME_IN_URL_VALUE", name_in_url).replace("PLAYERS_VALUE", players)


def bots_project() -> dict[str, str]:
    """path -> content of the project."""
    files = {
        "settings.py": SETTINGS,
        "requirements.txt": f"{OTREE_REQUIREMENT}\npsycopg2-binary\n",
        "_static/global/empty.css": "",
        "_rooms/lab.txt": "\n".join(ROOM_LABELS) + "\n",
        "guess/__init__.py": game("guess", "3"),
        "crowd/__init__.py": game("crowd", "None"),
        "survey/__init__.py": SURVEY,
        "survey/Survey.html": SURVEY_HTML,
        "survey/Again.html": AGAIN_HTML,
        "escape/__init__.py": ESCAPE,
        "escape/Leave.html": LEAVE_HTML,
        "checks/__init__.py": CHECKS,
        "checks/Intro.html": INTRO_HTML,
        "checks/Chat.html": CHAT_HTML,
        "checks/Slide.html": SLIDE_HTML,
    }
    for app in ("guess", "crowd"):
        files[f"{app}/Guess.html"] = GUESS_HTML
        files[f"{app}/Results.html"] = RESULTS_HTML
    return files


SESSION_CONFIGS = [
    {"name": "guess", "display_name": "Guess 2/3 of the average", "num_demo_participants": 3,
     "app_sequence": ["guess"]},
    {"name": "guess_survey", "display_name": "Guessing game, then a survey", "num_demo_participants": 3,
     "app_sequence": ["guess", "survey"]},
    {"name": "crowd", "display_name": "Guess 2/3 of the average, whole session", "num_demo_participants": 5,
     "app_sequence": ["crowd"]},
    {"name": "survey", "display_name": "The survey alone", "num_demo_participants": 1, "app_sequence": ["survey"]},
    {"name": "escape", "display_name": "A page that redirects out, then the survey", "num_demo_participants": 3,
     "app_sequence": ["escape", "survey"]},
    {"name": "checks", "display_name": "A plain page, a live page, a field set by JavaScript",
     "num_demo_participants": 2, "app_sequence": ["checks"]},
]

ROOMS = [{"name": "lab", "display_name": "Lab room", "participant_labels": ROOM_LABELS}]
