"""The data export's client against a hostile app: a small real HTTP server on loopback
stands in for the instance's oTree app (what it answers is the experimenter's code) and
answers the REST exports with a huge body, a redirect, a trickle of bytes, names that are
no file names, a failing custom export. The export refuses what it must, keeps within its
limits, writes nothing on failure, and never follows the app elsewhere.

The real oTree app's export (playing a session, reset, delete): test_data_export.py.
"""

from __future__ import annotations

import http.server
import io
import json
import socket
import threading
import time
import zipfile
from types import SimpleNamespace

import pytest

from instances import export, otree_api

KEY = "rest-key-of-the-test"
CSV = b"participant.code,player.payoff\nabc,1\n"


class App:
    """A stand-in app: `routes` maps a path (without the query) to a function
    (handler, query) that writes the whole answer itself."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.seen: list[tuple[str, str | None]] = []  # (path with query, the REST key it got)
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                app.seen.append((self.path, self.headers.get("otree-rest-key")))
                path, _, query = self.path.partition("?")
                route = app.routes.get(path)
                try:
                    if route is None:
                        send(self, 404, b"Not Found")
                    else:
                        route(self, query)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass  # the manager hung up: what it should do with a hostile answer

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def send(handler, status: int, body: bytes, content_type: str = "text/csv", **headers) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


def csv_of(name: bytes):
    return lambda handler, query: send(handler, 200, b"id," + name + b"\n1,2\n")


def good_routes(**changes) -> dict:
    routes = {
        "/api/otree_version": lambda h, q: send(h, 200, b'{"version": "6.0.15"}', "application/json"),
        "/api/apps": lambda h, q: send(h, 200, b'{"survey": "a survey"}', "application/json"),
        "/api/export_wide": lambda h, q: send(h, 200, CSV),
        "/api/export_app": lambda h, q: send(h, 200, f"app,{q}\n".encode()),
        "/api/export_app_custom": lambda h, q: send(h, 500, b"Internal Server Error"),
        "/api/export_page_times": csv_of(b"page"),
        "/api/export_chat": csv_of(b"chat"),
    }
    routes.update(changes)
    return routes


@pytest.fixture
def app():
    made = []

    def start(**changes):
        stand_in = App(good_routes(**changes))
        made.append(stand_in)
        return stand_in

    yield start
    for stand_in in made:
        stand_in.close()


INSTANCE = SimpleNamespace(name="hostile-data", rest_key=KEY, live_release=None)


def export_to(tmp_path, app, **kwargs):
    return export.write_data_zip(INSTANCE, tmp_path / "out.zip", base_url=app.url, **kwargs)


def left_over(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_a_well_behaved_app_gives_every_file_and_its_key_is_sent(tmp_path, app):
    stand_in = app()
    manifest = export_to(tmp_path, stand_in)
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        assert sorted(zf.namelist()) == ["ChatMessages.csv", "PageTimes.csv", "all_apps_wide.csv", "manifest.json",
                                         "survey.csv"]
        assert zf.read("all_apps_wide.csv") == CSV
        assert zf.read("survey.csv") == b"app,app=survey\n"
        inside = json.loads(zf.read("manifest.json"))
    assert inside["otree_version"] == "6.0.15" and inside["instance"] == "hostile-data"
    assert {f["name"]: f["bytes"] for f in inside["files"]}["all_apps_wide.csv"] == len(CSV)
    # No custom export (the app answered 500): noted, not fatal.
    assert inside["notes"] == ["survey: no custom export (the app answered HTTP 500)"]
    assert manifest["zip_bytes"] == (tmp_path / "out.zip").stat().st_size
    assert {key for _, key in stand_in.seen} == {KEY}
    assert left_over(tmp_path) == ["out.zip"]
    assert oct((tmp_path / "out.zip").stat().st_mode & 0o777) == "0o600"


def test_a_huge_answer_is_cut_off_at_the_limit_and_nothing_is_kept(tmp_path, app):
    sent = {"bytes": 0}

    def endless(handler, query):  # a CSV without end, chunked (no Content-Length)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/csv")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        block = b"x" * 65536
        while sent["bytes"] < 200 * 2**20:  # the test's own bound
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            sent["bytes"] += len(block)

    stand_in = app(**{"/api/export_wide": endless})
    with pytest.raises(export.ExportFailed, match=r"larger than LAB_EXPORT_MAX_MB \(1 MB\)"):
        export_to(tmp_path, stand_in, max_bytes=10**6)
    assert left_over(tmp_path) == []  # no zip, no temporary file
    assert sent["bytes"] < 100 * 2**20  # the manager hung up long before the app's own end


def test_the_limit_counts_every_file_together(tmp_path, app):
    half = b"y" * 600_000
    stand_in = app(**{"/api/export_wide": lambda h, q: send(h, 200, half),
                      "/api/export_app": lambda h, q: send(h, 200, half)})
    with pytest.raises(export.ExportFailed, match="larger than LAB_EXPORT_MAX_MB"):
        export_to(tmp_path, stand_in, max_bytes=10**6)
    assert left_over(tmp_path) == []


def test_a_redirect_is_refused_and_never_followed(tmp_path, app):
    elsewhere = app()  # where the app would send the manager (it must never be asked)
    stand_in = app(**{"/api/export_wide": lambda h, q: send(
        h, 302, b"", Location=f"{elsewhere.url}/api/export_wide")})
    with pytest.raises(export.ExportFailed, match="answered /api/export_wide with HTTP 302"):
        export_to(tmp_path, stand_in)
    assert elsewhere.seen == []
    assert left_over(tmp_path) == []


def test_a_redirect_of_an_optional_file_is_noted_not_followed(tmp_path, app):
    elsewhere = app()
    stand_in = app(**{"/api/export_page_times": lambda h, q: send(
        h, 301, b"", Location=f"{elsewhere.url}/api/export_page_times")})
    export_to(tmp_path, stand_in)
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        assert "PageTimes.csv" not in zf.namelist()
        notes = json.loads(zf.read("manifest.json"))["notes"]
    assert any(n.startswith("PageTimes.csv missing: the oTree app answered /api/export_page_times with HTTP 301")
               for n in notes), notes
    assert elsewhere.seen == []


def trickle(handler, query):
    """Headers, then one byte of body at a time, slower than any patience."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/csv")
    handler.send_header("Content-Length", "1000000")
    handler.end_headers()
    for _ in range(600):  # the test's own bound: at most 60 s
        handler.wfile.write(b"x")
        handler.wfile.flush()
        time.sleep(0.1)


def slow_headers(handler, query):
    """The status line, then a header byte by byte, forever (each read gets a byte in time)."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(600):
        handler.wfile.write(b"a")
        handler.wfile.flush()
        time.sleep(0.1)


@pytest.mark.parametrize("route", [trickle, slow_headers], ids=["body", "headers"])
def test_a_trickling_app_is_given_up_at_the_time_limit(tmp_path, app, route):
    stand_in = app(**{"/api/export_wide": route})
    with pytest.raises(export.ExportFailed, match=r"took longer than 2 s to answer /api/export_wide"):
        export_to(tmp_path, stand_in, seconds=2)
    assert left_over(tmp_path) == []


def test_app_names_that_are_no_file_names_are_skipped_with_a_note(tmp_path, app):
    names = {"../../etc/evil": "", "ok_app": "", "PageTimes": "", "a" * 65: "", "": "", "x y": "", "OK_APP": "",
             "caf\u00e9": ""}
    stand_in = app(**{"/api/apps": lambda h, q: send(h, 200, json.dumps(names).encode(), "application/json")})
    export_to(tmp_path, stand_in)
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        assert sorted(zf.namelist()) == ["ChatMessages.csv", "PageTimes.csv", "all_apps_wide.csv", "manifest.json",
                                         "ok_app.csv"]
        notes = json.loads(zf.read("manifest.json"))["notes"]
    skipped = [n for n in notes if " skipped: " in n]
    assert len(skipped) == 7, notes  # 5 unusable names, PageTimes, OK_APP.csv (ok_app.csv, ignoring case)
    assert any("'../../etc/evil'" in n for n in skipped)
    assert "OK_APP.csv skipped: a file of that name (ignoring case) is in the zip already" in notes
    assert not any(path.startswith("/api/export_app?app=..") for path, _ in stand_in.seen)


def test_an_app_that_is_not_running_or_gone_is_a_clear_failure(tmp_path, app):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(export.ExportFailed, match=r"did not answer /api/otree_version \(ConnectionRefusedError\)"):
        export.write_data_zip(INSTANCE, tmp_path / "out.zip", base_url=f"http://127.0.0.1:{port}")
    assert left_over(tmp_path) == []


def test_the_client_alone_refuses_redirects_and_large_json(app):
    stand_in = app(**{"/api/sessions": lambda h, q: send(h, 307, b"", Location="http://169.254.169.254/"),
                      "/api/big": lambda h, q: send(h, 200, b"[" + b"1," * 600_000 + b"1]", "application/json")})
    with pytest.raises(otree_api.OTreeUnavailable) as refused:
        otree_api.get_json(INSTANCE, "/api/sessions", base_url=stand_in.url)
    assert refused.value.kind == "status" and refused.value.status == 307
    with pytest.raises(otree_api.OTreeUnavailable, match="larger than 1 MiB") as big:
        otree_api.get_json(INSTANCE, "/api/big", base_url=stand_in.url, limit=2**20)
    assert big.value.kind == "too_large"
    sink = io.BytesIO()
    assert otree_api.stream(INSTANCE, "/api/export_wide", sink=sink.write, limit=100, base_url=stand_in.url) == len(CSV)
    assert sink.getvalue() == CSV
