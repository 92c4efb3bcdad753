"""Reading an app's sessions when the app (the experimenter's code) answers what it likes:
a stand-in app on loopback answers the REST API with real oTree shapes mixed with
nonsense; the manager keeps what is valid, bounded, and never more. The real oTree app is
read in tests/instances/test_session_guard.py."""

import json
import time

import pytest

from instances import otree_api, sessions
from tests.http_helpers import StandIn

pytestmark = pytest.mark.django_db


def _app(page_times: str, listed, wide: dict[str, str]):
    def answer(request):
        path, _, query = request.path.partition("?")
        if request.headers.get("otree-rest-key") != "the-key":
            return 403, {}, b"no key"
        if path == "/api/sessions":
            return 200, {"Content-Type": "application/json"}, json.dumps(listed).encode()
        if path == "/api/export_page_times":
            return 200, {"Content-Type": "text/csv"}, page_times.encode()
        if path == "/api/export_wide":
            code = query.partition("session_code=")[2]
            return 200, {"Content-Type": "text/csv"}, wide.get(code, "nonsense\n").encode()
        return 404, {}, b"?"
    return StandIn(answer)


HEADER = ("session_code,participant_id_in_session,participant_code,page_index,app_name,page_name,"
          "epoch_time_completed,round_number,timeout_happened,is_wait_page\n")
WIDE = ("participant.id_in_session,participant.code,participant.visited,participant._index_in_pages,"
        "participant._max_page_index,hello.1.player.id_in_group\n")


def test_only_valid_sessions_and_rows_are_kept(instance, monkeypatch):
    now = int(time.time())
    listed = [
        {"code": "abcd1234", "num_participants": 3, "config_name": "game", "label": "Tuesday", "created_at": now},
        {"code": "old00001", "num_participants": 2, "config_name": "game", "label": "", "created_at": now - 9999},
        {"code": "../../etc", "num_participants": 1},  # not a session code
        {"code": "huge0001", "num_participants": 10**12, "config_name": "x" * 5000},
        "not a session", None, 7,
    ]
    page_times = HEADER + "".join([
        f"abcd1234,1,p1,0,,InitializeParticipant,{now - 30},1,0,0\n",
        f"abcd1234,1,p1,1,hello,MyPage,{now - 20},1,0,0\n",
        f"abcd1234,2,p2,0,,InitializeParticipant,{now - 10},1,0,0\n",
        f"abcd1234,3,p3,0,,InitializeParticipant,{now - 5},1,0,0\n",
        f"old00001,1,q1,0,,InitializeParticipant,{now - 7200},1,0,0\n",
        "abcd1234,not-a-number,p9,0,,X,1,1,0,0\n",
        f"zzzz9999,1,z1,0,,InitializeParticipant,{now},1,0,0\n",  # a session the list does not have
        "x" * 10000 + "\n",
        "short,row\n",
    ])
    wide = {"abcd1234": WIDE + "1,p1,1,2,1,1\n2,p2,1,1,1,1\n3,p3,1,1,1,1\n",  # p1 past the last page: finished
            "old00001": WIDE + "1,q1,1,1,1,1\n2,q2,0,0,1,1\n"}
    with _app(page_times, listed, wide) as app:
        instance.rest_key = "the-key"
        monkeypatch.setattr(otree_api, "app_url", lambda inst: app.url.rstrip("/"))
        assert sessions.refresh(instance) is True
    by_code = {s["code"]: sessions.public(s) for s in instance.otree_sessions}
    assert set(by_code) == {"abcd1234", "old00001", "huge0001"}
    assert by_code["abcd1234"] == {"code": "abcd1234", "config": "game", "label": "Tuesday", "participants": 3,
                                   "started": 3, "finished": 1, "active": 2,
                                   "last_activity": by_code["abcd1234"]["last_activity"], "live": True}
    assert by_code["old00001"]["live"] is False and by_code["old00001"]["started"] == 1
    assert by_code["huge0001"]["participants"] == 0 and len(by_code["huge0001"]["config"]) == 100
    assert instance.live_sessions[0]["code"] == "abcd1234"  # the live ones first
    assert "active participants" in sessions.describe(instance.live_sessions)


def test_an_app_that_answers_nonsense_is_stale_and_holds_nothing_back(instance, monkeypatch):
    instance.otree_sessions = [{"code": "abcd1234", "config": "game", "live": True, "active": 2}]
    instance.save()
    with StandIn(lambda request: (200, {"Content-Type": "application/json"}, b"{not json")) as app:
        monkeypatch.setattr(otree_api, "app_url", lambda inst: app.url.rstrip("/"))
        assert sessions.refresh(instance) is False
    instance.refresh_from_db()
    assert "something else than JSON" in instance.sessions_problem
    assert instance.otree_sessions[0]["code"] == "abcd1234"  # the last read is kept
    assert instance.live_sessions == []
    sessions.require_idle(instance, "restarting")  # nothing refused
