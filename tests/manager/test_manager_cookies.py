"""The manager's cookies and host names, as a browser and an operator meet them.

- The session and CSRF cookies on real responses (a real login through the pages, CSRF
  enforced): HttpOnly, SameSite=Lax, host-only, Path=/; under HTTPS (LAB_PUBLIC_URL=https://…)
  also Secure and named __Host-… Each set-up is a fresh process with its own environment,
  since the cookie settings are derived from it at start.
- The manager never answers as the instances' host name (LAB_INSTANCE_HOST): it redirects
  before a cookie is read or set.
- A set-up in which instances would share the manager's host is refused at start with
  one clear line (no traceback), as are settings that would name the instances' host as
  the manager's; LAB_BEHIND_PROXY/LAB_PROXY_HOPS decide whether X-Forwarded-For counts.
(The browser walk is tests/e2e/test_e2e_cookies.py; origins of websockets: test_realtime.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.sessions.models import Session
from django.test import Client

from tests.conftest import ANN_PASSWORD

BASE_DIR = Path(__file__).resolve().parents[2]

# Run in a fresh process: migrate an in-memory database, log in through the login page as
# a browser would (CSRF enforced, the token taken from the form), then open the dashboard.
# ann is made there, in that process's own database (the test's fixtures cannot reach it).
LOGIN_SCRIPT = r"""
import json, os, re, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
django.setup()
from django.conf import settings
from django.core.management import call_command
from django.test import Client
from manager.accounts.models import User

call_command("migrate", verbosity=0, interactive=False)
User.objects.create_user("ann", "ann@lab.test", os.environ["CHECK_PASSWORD"])
origin = settings.LAB_PUBLIC_URL
secure = origin.startswith("https://")
host = origin.split("://", 1)[1]
browser = Client(enforce_csrf_checks=True, HTTP_HOST=host, secure=secure)
form = browser.get("/accounts/login/")
token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.content.decode()).group(1)
login = browser.post("/accounts/login/", {"login": "ann", "password": os.environ["CHECK_PASSWORD"],
                                          "csrfmiddlewaretoken": token}, HTTP_ORIGIN=origin)
dashboard = browser.get("/")
print(json.dumps({
    "set_cookie": [m.output(header="").strip() for r in (form, login) for m in r.cookies.values()],
    "login": login.status_code, "dashboard": dashboard.status_code,
    "names": [settings.SESSION_COOKIE_NAME, settings.CSRF_COOKIE_NAME],
}))
"""


def run_settings(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh Python with the manager's settings made from `env` (over a clean
    environment of this test run: its own data dir, the run's Redis)."""
    data_dir = tempfile.mkdtemp(prefix="labcookie-")
    child = {k: v for k, v in os.environ.items() if not k.startswith("LAB_") or k == "LAB_LOGIN_RATE_LIMIT"}
    child.update(LAB_DATA_DIR=data_dir, REDIS_URL=settings.REDIS_URL, DATABASE_URL="sqlite://:memory:",
                 PYTHONUNBUFFERED="1", **env)
    try:
        return subprocess.run([sys.executable, "-c", code], cwd=BASE_DIR, env=child, capture_output=True,
                              text=True, timeout=timeout)
    finally:
        subprocess.run(["rm", "-rf", data_dir], check=False)


def cookies_of_a_login(**env: str) -> dict:
    done = run_settings(LOGIN_SCRIPT, CHECK_PASSWORD=ANN_PASSWORD, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    jar = SimpleCookie()
    for header in result["set_cookie"]:
        jar.load(header)
    result["jar"] = jar
    return result


def flags(morsel) -> dict:
    return {"httponly": bool(morsel["httponly"]), "secure": bool(morsel["secure"]),
            "samesite": morsel["samesite"], "path": morsel["path"], "domain": morsel["domain"]}


def test_cookies_over_plain_http_are_httponly_lax_and_host_only():
    result = cookies_of_a_login(LAB_PUBLIC_HOST="127.0.0.1")  # the embedded default, http://127.0.0.1:8000
    assert result["login"] == 302 and result["dashboard"] == 200
    assert result["names"] == ["sessionid", "csrftoken"]
    jar = result["jar"]
    assert set(jar) == {"sessionid", "csrftoken"}
    for name in ("sessionid", "csrftoken"):
        assert flags(jar[name]) == {"httponly": True, "secure": False, "samesite": "Lax", "path": "/", "domain": ""}


def test_cookies_under_https_are_secure_and_carry_the_host_prefix():
    result = cookies_of_a_login(LAB_PUBLIC_URL="https://lab.example.edu", LAB_PUBLIC_HOST="lab.example.edu",
                                LAB_INSTANCE_HOST="experiments.example.edu", LAB_BEHIND_PROXY="1")
    # The whole login works with the renamed cookies (the dashboard opens with them).
    assert result["login"] == 302 and result["dashboard"] == 200
    jar = result["jar"]
    assert set(jar) == {"__Host-sessionid", "__Host-csrftoken"}
    for name in jar:
        # What the __Host- prefix requires of the browser: Secure, Path=/, no Domain.
        assert flags(jar[name]) == {"httponly": True, "secure": True, "samesite": "Lax", "path": "/", "domain": ""}


def test_no_page_script_reads_the_csrf_cookie():
    """The CSRF cookie is HttpOnly: scripts take the token from the page (htmx's
    hx-headers, the kiosk's form field), never from document.cookie."""
    found = []
    for folder in ("static/js", "templates"):
        for path in (BASE_DIR / folder).rglob("*"):
            if path.is_file() and path.suffix in {".js", ".html"} and "document.cookie" in path.read_text():
                found.append(str(path.relative_to(BASE_DIR)))
    assert found == []
    assert 'hx-headers=\'{"X-CSRFToken": "{{ csrf_token }}"}\'' in (BASE_DIR / "templates/base.html").read_text()


# --- the instances' host name is never the manager's ----------------------------------------


@pytest.mark.django_db
def test_a_request_for_the_instances_host_is_redirected_before_any_cookie(ann):
    assert settings.LAB_INSTANCE_HOST == "localhost" and settings.LAB_PUBLIC_URL == "http://127.0.0.1:8000"
    assert "localhost" not in settings.ALLOWED_HOSTS
    browser = Client(HTTP_HOST="localhost:8000")
    response = browser.get("/instances/ann-study/?tab=logs")
    assert response.status_code == 302 and response["Location"] == "http://127.0.0.1:8000/instances/ann-study/?tab=logs"
    assert response.cookies == {} and response["Cache-Control"] == "no-store"
    # Not even a correct login sets a cookie there.
    response = browser.post("/accounts/login/", {"login": "ann", "password": ANN_PASSWORD})
    assert response.status_code == 302 and response["Location"] == "http://127.0.0.1:8000/accounts/login/"
    assert response.cookies == {} and not Session.objects.exists()
    # Other spellings of that name, too.
    for host in ("LOCALHOST:8000", "localhost", "localhost.:8000"):
        assert Client(HTTP_HOST=host).get("/").status_code == 302, host
    # The supervisor's health check is answered wherever it asks (LAB_HOST may be that name).
    response = browser.get("/healthz/")
    assert response.status_code == 200 and response.content == b"ok" and response.cookies == {}
    # The manager's own name works as ever.
    assert Client(HTTP_HOST="127.0.0.1:8000").get("/accounts/login/").status_code == 200


# --- start-up: refused set-ups, and what the settings make of the environment -------------


def test_labserver_refuses_to_start_when_instances_would_share_the_managers_host():
    data_dir = tempfile.mkdtemp(prefix="labrefuse-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAB_")}
    env.update(LAB_DATA_DIR=data_dir, LAB_HOST="127.0.0.1", LAB_INSTANCE_HOST="127.0.0.1")
    proc = subprocess.Popen([sys.executable, "manage.py", "labserver"], cwd=BASE_DIR, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # it started after all: take its whole group down
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        subprocess.run(["rm", "-rf", data_dir], check=False)
    assert proc.returncode != 0
    assert err.strip() == ("error: LAB_INSTANCE_HOST=127.0.0.1 is the manager's own host name: the instances would "
                           "receive the manager's cookies (cookies ignore ports); use another name of this server")
    assert "Traceback" not in out + err


@pytest.mark.parametrize("env, message", [
    ({"LAB_PUBLIC_HOST": "lab.example.edu"},
     "error: LAB_INSTANCE_HOST is required with LAB_PUBLIC_HOST=lab.example.edu and port routing"),
    ({"LAB_PUBLIC_HOST": "lab.example.edu", "LAB_INSTANCE_HOST": "LAB.example.edu"},
     "error: LAB_INSTANCE_HOST=LAB.example.edu is the manager's own host name"),
    ({"LAB_PUBLIC_URL": "https://lab.example.edu", "LAB_PUBLIC_HOST": "10.0.0.5", "LAB_INSTANCE_HOST": "lab.example.edu"},
     "error: LAB_INSTANCE_HOST=lab.example.edu is the manager's own host name"),
    ({"LAB_ALLOWED_HOSTS": "lab.internal,localhost"},
     "error: LAB_ALLOWED_HOSTS names localhost, where the instances are served"),
    ({"LAB_PUBLIC_HOST": "lab.example.edu", "LAB_INSTANCE_HOST": "run.example.edu", "LAB_ALLOWED_HOSTS": ".example.edu"},
     "error: LAB_ALLOWED_HOSTS names .example.edu, where the instances are served"),
    ({"LAB_CSRF_TRUSTED_ORIGINS": "http://localhost:18000"},
     "error: LAB_CSRF_TRUSTED_ORIGINS names http://localhost:18000, where the instances are served"),
    ({"LAB_ROUTING": "subdomain", "LAB_DOMAIN": "lab.test", "LAB_PUBLIC_HOST": "manager.lab.test",
      "LAB_CSRF_TRUSTED_ORIGINS": "https://*.lab.test"},
     "error: LAB_CSRF_TRUSTED_ORIGINS names https://*.lab.test, where the instances are served"),
    ({"LAB_CSRF_TRUSTED_ORIGINS": "lab.example.edu"},
     "error: LAB_CSRF_TRUSTED_ORIGINS: 'lab.example.edu' is not an origin such as https://lab.example.edu"),
    ({"LAB_BEHIND_PROXY": "1", "LAB_PROXY_HOPS": "0"},
     "error: LAB_PROXY_HOPS must be the number of proxies in front of the manager (1-10), got 0"),
    ({"LAB_PROXY_TRUSTED_IPS": "10.0.0.0/8,proxy.lab"},
     "error: LAB_PROXY_TRUSTED_IPS: 'proxy.lab' is not an IP address or network"),
])
def test_set_ups_that_would_hand_the_managers_cookies_to_instances_are_refused(env, message):
    data_dir = tempfile.mkdtemp(prefix="labrefuse-")
    child = {k: v for k, v in os.environ.items() if not k.startswith("LAB_")}
    child.update(LAB_DATA_DIR=data_dir, **env)
    try:
        done = subprocess.run([sys.executable, "manage.py", "check"], cwd=BASE_DIR, env=child, capture_output=True,
                              text=True, timeout=60)
    finally:
        subprocess.run(["rm", "-rf", data_dir], check=False)
    assert done.returncode != 0
    assert done.stderr.startswith(message), done.stderr
    assert "Traceback" not in done.stderr


PRINT_SETTINGS = """
import django, json, os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
django.setup()
from django.conf import settings as s
print(json.dumps({"proxy_count": s.ALLAUTH_TRUSTED_PROXY_COUNT, "url": s.LAB_PUBLIC_URL,
                  "instance_host": s.LAB_INSTANCE_HOST, "allowed": s.ALLOWED_HOSTS}))
"""


@pytest.mark.parametrize("env, proxy_count", [
    ({}, 0),
    ({"LAB_PROXY_HOPS": "2"}, 0),  # hops alone trust nothing
    ({"LAB_BEHIND_PROXY": "1"}, 1),
    ({"LAB_BEHIND_PROXY": "1", "LAB_PROXY_HOPS": "2"}, 2),
])
def test_x_forwarded_for_is_trusted_only_behind_a_proxy(env, proxy_count):
    done = run_settings(PRINT_SETTINGS, **env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["proxy_count"] == proxy_count


@pytest.mark.parametrize("public_host, instance_host", [("127.0.0.1", "localhost"), ("localhost", "127.0.0.1")])
def test_the_embedded_set_up_needs_no_configuration(public_host, instance_host):
    done = run_settings(PRINT_SETTINGS, LAB_PUBLIC_HOST=public_host)
    assert done.returncode == 0, done.stderr
    values = json.loads(done.stdout)
    assert values["instance_host"] == instance_host and instance_host not in values["allowed"]
