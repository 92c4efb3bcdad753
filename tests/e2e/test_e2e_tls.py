"""HTTPS with Caddy's internal CA through a real `labserver` (LAB_TLS=internal), as a lab
would try it: the manager on https://localhost:<port>, the instances on 127.0.0.1 (Caddy's
internal CA issues IP certificates), high free ports instead of 443/80. The root
certificate is taken from the manager's own page; everything after is verified against it
alone: the login page (also in headless Chromium), Secure cookies, HSTS, the redirect of plain HTTP, the client's real
address in the audit log, an instance port over TLS (and plain HTTP to it redirected), and
a real `git push` over HTTPS with GIT_SSL_CAINFO (refused without it)."""

from __future__ import annotations

import http.cookiejar
import re
import sqlite3
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests import backends
from tests.labserver_helpers import (BASE_DIR, LabServer, child_env, first_superuser, free_port, migrate,
                                     new_data_dir, remove_data_dir, remove_instances)
from tests.otree_projects import Checkout, valid_project
from tests.waits import wait_until

pytestmark = pytest.mark.slow


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def opener(context=None, jar=None):
    handlers = [NoRedirect(), urllib.request.HTTPSHandler(context=context or ssl.create_default_context())]
    if jar is not None:
        handlers.append(urllib.request.HTTPCookieProcessor(jar))
    return urllib.request.build_opener(*handlers)


def fetch(op, url, data=None, headers=None):
    """(status, headers, body) of one request, redirects not followed."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with op.open(request, timeout=15) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def websocket_status(port, cafile, origin, session) -> int:
    """The status of a websocket handshake to wss://localhost:port/ws/live/ from `origin`."""
    import base64
    import os
    import socket

    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /ws/live/ HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Origin: {origin}\r\nCookie: __Host-sessionid={session}\r\n\r\n").encode())
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def browser_login(base, intermediate_pem, username, password):
    """Log in with headless Chromium. Chromium has no trust store this test may write to
    (no NSS tools), so the CA is trusted by pinning its key: the pin flag matches keys of the
    chain the server sends (the certificate and Caddy's intermediate, not the root), hence
    the intermediate's key."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    from tests.conftest import CHROMIUM, need
    from tests.e2e.test_e2e_notifications import CHROMIUM_ARGS, TIMEOUT_MS

    need(CHROMIUM.exists(), f"chromium ({CHROMIUM})")
    spki = x509.load_pem_x509_certificate(intermediate_pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pin = base64.b64encode(__import__("hashlib").sha256(spki).digest()).decode()
    with sync_playwright() as pw:
        # Without the root: Chromium refuses the certificate (nothing is trusted blindly).
        plain_browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            with pytest.raises(PlaywrightError, match="ERR_CERT_AUTHORITY_INVALID"):
                plain_browser.new_page().goto(base + "/accounts/login/")
        finally:
            plain_browser.close()
        # With the CA trusted (as on a lab computer that installed root.crt).
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={pin}"])
        try:
            context = browser.new_context()
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            page.goto(base + "/accounts/login/")
            assert page.get_by_role("link", name="the lab's root certificate").get_attribute("href") == "/tls/"
            page.fill("input[name=login]", username)
            page.fill("input[name=password]", password)
            page.click("main form button[type=submit]")
            page.wait_for_url(lambda url: "/accounts/login/" not in url)
            assert page.url.startswith(base + "/")
            cookies = {c["name"]: c for c in context.cookies()}
            for name in ("__Host-sessionid", "__Host-csrftoken"):
                assert cookies[name]["secure"] is True and cookies[name]["domain"] == "localhost", cookies
            page.wait_for_function("document.getElementById('live-status')?.textContent === 'live'",
                                   timeout=TIMEOUT_MS)  # the websocket over wss://
        finally:
            browser.close()


def test_internal_ca_login_cookies_hsts_instance_port_and_git_push_over_https(tmp_path):
    backends.require("process")
    data_dir, port = new_data_dir(), free_port()
    https_port, http_port, public_port = free_port(), free_port(), free_port()
    extra = {"LAB_TLS": "internal", "LAB_PUBLIC_HOST": "localhost", "LAB_INSTANCE_HOST": "127.0.0.1",
             "LAB_HTTPS_PORT": str(https_port), "LAB_HTTP_PORT": str(http_port), "LAB_HSTS_SECONDS": "900",
             "LAB_INSTANCE_PORTS": f"{public_port}-{public_port}", "LAB_RUNTIME": "process",
             "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    base = f"https://localhost:{https_port}"
    migrate(data_dir, port)
    server = LabServer(data_dir, port, **extra)
    try:
        server.wait_for(re.escape(f"oTree Lab Manager is running on {base}"), 180)
        username, password = first_superuser(server)

        # A lab computer fetches the root (the browser warns once: not yet trusted) and
        # compares the fingerprint the page shows.
        untrusted = ssl.create_default_context()
        untrusted.check_hostname, untrusted.verify_mode = False, ssl.CERT_NONE
        status, headers, root_pem = wait_until(
            lambda: fetch(opener(untrusted), f"{base}/tls/root.crt"), 60, 0.5, "the CA page over HTTPS",
            ignore=(OSError,))
        assert status == 200 and headers["Content-Type"] == "application/x-x509-ca-cert"
        assert root_pem.startswith(b"-----BEGIN CERTIFICATE-----")
        root_file = tmp_path / "root.crt"
        root_file.write_bytes(root_pem)
        der = ssl.PEM_cert_to_DER_cert(root_pem.decode())
        digest = __import__("hashlib").sha256(der).hexdigest().upper()
        trusted = ssl.create_default_context(cafile=str(root_file))
        jar = http.cookiejar.CookieJar()
        browser = opener(trusted, jar)
        status, _h, page = fetch(browser, f"{base}/tls/")
        assert status == 200 and ":".join(re.findall("..", digest)) in page.decode()
        # Without the root the manager's certificate is not trusted (the system store does not have it).
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch(opener(), f"{base}/accounts/login/")

        # The login page, verified against that root: Secure cookies, HSTS, the CA page linked.
        status, headers, page = fetch(browser, f"{base}/accounts/login/")
        assert status == 200, page[:300]
        assert headers["Strict-Transport-Security"].startswith("max-age=900")
        assert 'href="/tls/"' in page.decode()
        cookies = {c.name: c for c in jar}
        assert cookies["__Host-csrftoken"].secure
        # Plain HTTP is sent to HTTPS.
        status, headers, _ = fetch(opener(), f"http://localhost:{http_port}/accounts/login/?next=/")
        assert status == 308 and headers["Location"] == f"{base}/accounts/login/?next=/"

        # Log in (a client that claims another address in X-Forwarded-For): the session
        # cookie is Secure, and the audit log has the real client address.
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1).decode()
        form = urllib.parse.urlencode({"csrfmiddlewaretoken": token, "login": username, "password": password})
        status, headers, body = fetch(browser, f"{base}/accounts/login/", form.encode(), {
            "Referer": f"{base}/accounts/login/", "Origin": base, "X-Forwarded-For": "203.0.113.9",
            "Content-Type": "application/x-www-form-urlencoded"})
        assert status == 302, body[:500]
        assert {c.name: c for c in jar}["__Host-sessionid"].secure
        # The live updates' websocket through Caddy (wss://, the https origin accepted).
        session = {c.name: c for c in jar}["__Host-sessionid"].value
        assert websocket_status(https_port, root_file, base, session) == 101
        assert websocket_status(https_port, root_file, f"https://127.0.0.1:{public_port}", session) == 403
        with sqlite3.connect(data_dir / "manager.sqlite3") as db:
            ips = [row[0] for row in db.execute(
                "SELECT ip FROM audit_auditevent WHERE action = 'auth.login'")]
        assert ips == ["127.0.0.1"], ips

        # An instance (process runtime): its port speaks TLS for 127.0.0.1 with HSTS;
        # plain HTTP to that port is redirected to https on it.
        api_token = subprocess.run(
            [sys.executable, "manage.py", "create_token", username, "--name", "tls"], cwd=BASE_DIR,
            env=child_env(data_dir, port, **extra), capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()
        auth = {"Authorization": f"Bearer {api_token}", "Content-Type": "application/json"}
        status, _h, body = fetch(browser, f"{base}/api/v1/instances",
                                 b'{"name": "tlsstudy", "owner": "%s"}' % username.encode(), auth)
        assert status == 201, body

        def ready():
            current = __import__("json").loads(fetch(browser, f"{base}/api/v1/instances/tlsstudy",
                                                     headers=auth)[2])
            assert current["status"] in {"ready_for_code", "failed"}, current
            return current

        made = wait_until(ready, 120, 0.5, "the instance is set up", ignore=(AssertionError,))
        assert made["status"] == "ready_for_code", made
        assert made["url"] == f"https://127.0.0.1:{public_port}/"
        assert made["git"]["https_url"] == f"{base}/git/tlsstudy.git"
        status, headers, body = wait_until(lambda: fetch(browser, f"https://127.0.0.1:{public_port}/"), 60, 0.5,
                                           "the instance's port over TLS", ignore=(OSError,))
        assert status == 503 and b"no app running yet" in body  # the instance's own page, over TLS
        assert headers["Strict-Transport-Security"] == "max-age=900"
        status, headers, _ = fetch(opener(), f"http://127.0.0.1:{public_port}/room/lab")
        assert status in (301, 302, 307, 308) and headers["Location"] == f"https://127.0.0.1:{public_port}/room/lab"

        # A real browser that trusts that root (and only it): the login over HTTPS, the
        # manager's cookies Secure and __Host- as Chromium itself keeps them, the live socket.
        intermediate = (data_dir / "caddy" / "data" / "pki" / "authorities" / "local" / "intermediate.crt").read_bytes()
        browser_login(base, intermediate, username, password)

        # git push over HTTPS with the same certificate (a branch: stored, nothing built).
        checkout = Checkout(tmp_path / "work")
        checkout.commit(valid_project("v1"), "first")
        remote = f"https://{username}:{api_token}@localhost:{https_port}/git/tlsstudy.git"
        env = {"GIT_TERMINAL_PROMPT": "0", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
        refused = subprocess.run(["git", "push", remote, "HEAD:refs/heads/draft"], cwd=checkout.dir, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "certificate" in refused.stderr.lower(), refused.stderr
        pushed = subprocess.run(["git", "push", remote, "HEAD:refs/heads/draft"], cwd=checkout.dir,
                                env={**env, "GIT_SSL_CAINFO": str(root_file)}, capture_output=True, text=True,
                                timeout=120)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        assert "Branch draft stored" in pushed.stderr and api_token not in pushed.stderr, pushed.stderr
    finally:
        server.terminate()
        server.kill_everything()
        remove_instances(data_dir, port, **extra)
        remove_data_dir(data_dir)


def test_labserver_refuses_to_start_when_the_https_port_is_taken(tmp_path):
    import socket

    data_dir, port, https_port, http_port = new_data_dir(), free_port(), free_port(), free_port()
    extra = {"LAB_TLS": "internal", "LAB_PUBLIC_HOST": "localhost", "LAB_INSTANCE_HOST": "127.0.0.1",
             "LAB_HTTPS_PORT": str(https_port), "LAB_HTTP_PORT": str(http_port)}
    migrate(data_dir, port)
    with socket.socket() as other:
        other.bind(("127.0.0.1", https_port))
        other.listen()
        server = LabServer(data_dir, port, **extra)
        try:
            server.wait_for(re.escape(f"LAB_HTTPS_PORT={https_port}: port {https_port} is already in use by another "
                                      "program"), 120)
            assert server.proc.wait(timeout=60) != 0
            server._reader.join(timeout=10)
            assert "oTree Lab Manager is running" not in server.output
            assert "started web" not in server.output  # refused before anything started
            assert "Password:" not in server.output  # and before the first account is made
        finally:
            server.terminate()
            server.kill_everything()
            remove_data_dir(data_dir)
