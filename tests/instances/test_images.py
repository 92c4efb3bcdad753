"""The container images of an instance (LAB_IMAGE_POSTGRES / _REDIS / _PYTHON) behave as
the manager relies on: those built by `manage.py build_images` (CI builds them before
the suite; the tests never build) or the official ones under the same names. The swarm
runtime's registry image (LAB_IMAGE_REGISTRY): test_registry_image.py.

Every container and network a test creates carries this run's label and is removed at
the end; the tests talk only to containers they created. Waits are bounded.
"""

from __future__ import annotations

import io
import socket
import uuid
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from instances.images import builder
from tests.conftest import need
from tests.waits import wait_until

RUN = uuid.uuid4().hex[:10]
TEST_LABEL = "org.otree-lab.test-images"
PG, REDIS, PY = settings.LAB_IMAGE_POSTGRES, settings.LAB_IMAGE_REDIS, settings.LAB_IMAGE_PYTHON
PASSWORD = "pa'ss wo\"rd$1@:/;\\"  # quoting: SQL literal, shell, environment
LEAN = ["-c", "shared_buffers=16MB", "-c", "max_connections=30"]


def _engine():
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
        return client
    except Exception:
        return None


@pytest.fixture(scope="module")
def engine():
    client = _engine()
    need(client is not None, "Docker engine")
    try:
        yield client
    finally:  # whatever a failed test left behind
        for container in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={RUN}"}):
            container.remove(force=True, v=True)
        for network in client.networks.list(filters={"label": f"{TEST_LABEL}={RUN}"}):
            network.remove()
        client.close()


class Docker:
    """Creates labelled containers and networks and removes them again."""

    def __init__(self, client):
        self.client = client
        self.containers = []
        self.networks = []

    def image(self, tag: str) -> str:
        need(builder.image_exists(self.client, tag), f"the image {tag} (python manage.py build_images)")
        return tag

    def network(self):
        net = self.client.networks.create(f"otl-imgtest-{RUN}-{len(self.networks)}", labels={TEST_LABEL: RUN})
        self.networks.append(net)
        return net

    def start(self, image: str, command=None, **kw):
        kw.setdefault("name", f"otl-imgtest-{RUN}-{len(self.containers)}")
        container = self.client.containers.run(image, command, detach=True, labels={TEST_LABEL: RUN}, **kw)
        self.containers.append(container)
        return container

    def output(self, image: str, command, **kw) -> str:
        """Run a command in a new container to its end; its output (exit 0 asserted)."""
        container = self.start(image, command, **kw)
        result = container.wait(timeout=60)
        logs = container.logs().decode(errors="replace")
        assert result["StatusCode"] == 0, logs
        return logs

    def cleanup(self):
        for container in self.containers:
            try:
                container.remove(force=True, v=True)
            except Exception:
                pass
        for net in self.networks:
            try:
                net.remove()
            except Exception:
                pass


@pytest.fixture
def dock(engine):
    d = Docker(engine)
    try:
        yield d
    finally:
        d.cleanup()


def up(check, what: str, timeout: float = 60):
    return wait_until(check, timeout, 0.1, what, ignore=(Exception,))  # any error: not up yet


def exec_out(container, cmd, **kw) -> tuple[int, str]:
    result = container.exec_run(cmd, **kw)
    return result.exit_code, result.output.decode(errors="replace").strip()


def pid1_user(container) -> str:
    code, user = exec_out(container, ["stat", "-c", "%U", "/proc/1"])
    assert code == 0, user
    return user


def host_port(container, port: str) -> int:
    container.reload()
    return int(container.attrs["NetworkSettings"]["Ports"][port][0]["HostPort"])


def pg_connect(port: int, user: str, password: str, dbname: str):
    return psycopg.connect(host="127.0.0.1", port=port, user=user, password=password, dbname=dbname,
                           connect_timeout=3, autocommit=True)


def pg_ready(port: int, user: str, password: str, dbname: str):
    def check():
        with pg_connect(port, user, password, dbname) as conn:
            return conn.execute("select 1").fetchone() == (1,)

    up(check, "PostgreSQL accepting the password login")


# --- postgres -------------------------------------------------------------------------


@pytest.mark.docker
def test_postgres_user_password_database_and_options(dock):
    image = dock.image(PG)
    env = {"POSTGRES_PASSWORD": PASSWORD, "POSTGRES_USER": "lab_user", "POSTGRES_DB": "lab db"}
    pg = dock.start(image, LEAN, environment=env, ports={"5432/tcp": ("127.0.0.1", None)})
    port = host_port(pg, "5432/tcp")
    pg_ready(port, "lab_user", PASSWORD, "lab db")  # over TCP from outside: SCRAM password

    with pg_connect(port, "lab_user", PASSWORD, "lab db") as conn:
        row = conn.execute("select current_user, current_database(), current_setting('shared_buffers'),"
                           " current_setting('max_connections'), current_setting('server_encoding'),"
                           " (select rolsuper from pg_roles where rolname = current_user),"
                           " pg_get_userbyid((select datdba from pg_database where datname = current_database()))"
                           ).fetchone()
        assert row == ("lab_user", "lab db", "16MB", "30", "UTF8", True, "lab_user")
        assert conn.execute("show port").fetchone() == ("5432",)
        conn.execute("create table kept (x int); insert into kept values (42)")

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        pg_connect(port, "lab_user", "wrong password", "lab db")
    with pytest.raises(psycopg.OperationalError):
        pg_connect(port, "lab_user", "", "lab db")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        pg_connect(port, "postgres", PASSWORD, "postgres")  # only POSTGRES_USER got the password

    assert pid1_user(pg) == "postgres"
    # Trust only on the local socket: TCP inside the container still wants the password.
    code, out = exec_out(pg, ["psql", "-h", "127.0.0.1", "-U", "lab_user", "-w", "-d", "lab db", "-c", "select 1"])
    assert code != 0, out
    code, out = exec_out(pg, ["psql", "-U", "lab_user", "-d", "lab db", "-Atc", "select x from kept"])
    assert (code, out) == (0, "42")
    assert exec_out(pg, ["pg_isready", "-h", "127.0.0.1"])[0] == 0
    code, _ = exec_out(pg, ["sh", "-c", "pg_dump -U lab_user -Fc 'lab db' > /tmp/d && createdb -U lab_user r"
                                        " && pg_restore -U lab_user -d r /tmp/d"])
    assert code == 0
    assert exec_out(pg, ["psql", "-U", "lab_user", "-d", "r", "-Atc", "select x from kept"]) == (0, "42")

    # A restart keeps data, role and password (no second initialisation).
    pg.restart(timeout=20)
    port = host_port(pg, "5432/tcp")
    pg_ready(port, "lab_user", PASSWORD, "lab db")
    with pg_connect(port, "lab_user", PASSWORD, "lab db") as conn:
        assert conn.execute("select x from kept").fetchone() == (42,)


@pytest.mark.docker
def test_postgres_defaults_and_refusal_without_password(dock):
    image = dock.image(PG)
    pg = dock.start(image, environment={"POSTGRES_PASSWORD": "only-this"}, ports={"5432/tcp": ("127.0.0.1", None)})
    port = host_port(pg, "5432/tcp")
    pg_ready(port, "postgres", "only-this", "postgres")  # user postgres, database = user
    with pg_connect(port, "postgres", "only-this", "postgres") as conn:
        assert conn.execute("select current_user, current_database()").fetchone() == ("postgres", "postgres")

    bare = dock.start(image)  # no POSTGRES_PASSWORD: refuses to start, says why
    assert bare.wait(timeout=60)["StatusCode"] != 0
    assert "POSTGRES_PASSWORD" in bare.logs().decode(errors="replace")


@pytest.mark.docker
def test_postgres_on_a_named_volume_from_another_container(dock):
    """As an instance uses it: a volume, a private network, the client in another container."""
    image = dock.image(PG)
    net = dock.network()
    volume = dock.client.volumes.create(f"otl-imgtest-{RUN}-pgdata", labels={TEST_LABEL: RUN})
    try:
        env = {"POSTGRES_PASSWORD": PASSWORD, "POSTGRES_USER": "otree", "POSTGRES_DB": "otree"}
        pg = dock.start(image, LEAN, environment=env, network=net.name,
                        volumes={volume.name: {"bind": "/var/lib/postgresql/data", "mode": "rw"}})
        up(lambda: exec_out(pg, ["pg_isready", "-q", "-h", "127.0.0.1"])[0] == 0, "pg_isready")
        out = dock.output(image, ["psql", "-h", pg.name, "-U", "otree", "-d", "otree", "-Atc", "select current_user"],
                          environment={"PGPASSWORD": PASSWORD}, network=net.name)
        assert out.strip() == "otree"
        # The same volume in a new container: the data and password are kept.
        pg.remove(force=True, v=True)
        pg = dock.start(image, LEAN, environment={"POSTGRES_PASSWORD": "ignored now"}, network=net.name,
                        volumes={volume.name: {"bind": "/var/lib/postgresql/data", "mode": "rw"}})
        up(lambda: exec_out(pg, ["pg_isready", "-q", "-h", "127.0.0.1"])[0] == 0, "pg_isready")
        out = dock.output(image, ["psql", "-h", pg.name, "-U", "otree", "-d", "otree", "-Atc", "select 1"],
                          environment={"PGPASSWORD": PASSWORD}, network=net.name)
        assert out.strip() == "1"
    finally:
        dock.cleanup()
        volume.remove(force=True)


# --- redis ----------------------------------------------------------------------------


@pytest.mark.docker
def test_redis_answers_on_the_network_as_non_root(dock):
    image = dock.image(REDIS)
    net = dock.network()
    plain = dock.start(image, network=net.name)
    tuned = dock.start(image, ["--maxmemory", "32mb"], network=net.name)  # options as in the official image
    for server in (plain, tuned):
        up(lambda: exec_out(server, ["redis-cli", "ping"]) == (0, "PONG"), "redis PING")
        assert pid1_user(server) == "redis"
    script = (f"redis-cli -h {plain.name} ping && redis-cli -h {tuned.name} ping"
              f" && redis-cli -h {tuned.name} config get maxmemory")
    out = dock.output(image, ["sh", "-c", script], network=net.name).split()
    assert out == ["PONG", "PONG", "maxmemory", str(32 * 2**20)]
    for server in (plain, tuned):
        for name, value in (("protected-mode", "no"), ("save", ""), ("appendonly", "no"), ("port", "6379")):
            code, out = exec_out(server, ["redis-cli", "config", "get", name])
            lines = out.split("\n")
            assert (code, lines[0], lines[1] if len(lines) > 1 else "") == (0, name, value)


# --- python ---------------------------------------------------------------------------


@pytest.mark.docker
def test_python_pip_git(dock):
    image = dock.image(PY)
    ours = builder.LABEL in (dock.client.images.get(image).labels or {})
    script = (
        "python -c 'import sys; print(sys.version_info[:2])' && pip --version"
        " && mkdir -p /tmp/p/hello && echo 'X = 7' > /tmp/p/hello/__init__.py"
        " && printf 'from setuptools import setup\\nsetup(name=\"hello\", version=\"1\", packages=[\"hello\"])\\n'"
        "    > /tmp/p/setup.py"
        " && pip install -q --no-index --no-build-isolation --disable-pip-version-check /tmp/p"
        " && cd / && python -c 'import hello; print(\"hello\", hello.X)'"
    )
    if ours:  # the official slim image has no git
        script += " && git --version"
    out = dock.output(image, ["sh", "-c", script])
    assert "(3, 11)" in out
    assert "pip " in out
    assert "hello 7" in out
    if ours:
        assert "git version" in out


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.docker
def test_python_pip_reaches_pypi(dock):
    """pip over TLS, through an intercepting proxy when the image got its CA bundle."""
    image = dock.image(PY)
    need(_pypi_reachable(), "pypi.org (a package registry CI reaches)")
    out = dock.output(image, ["pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                              "-d", "/tmp/dl", "six==1.16.0"])
    assert "ERROR" not in out


# --- the command ----------------------------------------------------------------------


@pytest.mark.docker
def test_build_images_skips_existing_images(engine):
    for tag in (PG, REDIS, PY, settings.LAB_IMAGE_REGISTRY):
        need(builder.image_exists(engine, tag), f"the image {tag} (python manage.py build_images)")
    stdout = io.StringIO()
    call_command("build_images", stdout=stdout)
    out = stdout.getvalue()
    for tag in (PG, REDIS, PY, settings.LAB_IMAGE_REGISTRY):
        assert f"{tag} exists, skipped" in out
    assert "building" not in out


def test_clear_errors(tmp_path, monkeypatch):
    not_pem = tmp_path / "bundle.crt"
    not_pem.write_text("hello\n")
    with pytest.raises(CommandError, match="no PEM certificate"):
        call_command("build_images", "--ca-bundle", str(not_pem))
    with pytest.raises(CommandError, match="cannot read the CA bundle"):
        call_command("build_images", "--ca-bundle", str(tmp_path / "missing.crt"))
    with pytest.raises(CommandError):
        call_command("build_images", "--only", "mysql")

    with pytest.raises(builder.BuildError, match="unreachable"):
        builder.check_mirror("http://127.0.0.1:9/debian", "bookworm", [])
    monkeypatch.setattr(builder.shutil, "which", lambda name: None)
    monkeypatch.setattr(builder.os, "geteuid", lambda: 0)
    with pytest.raises(builder.BuildError, match="apt install debootstrap"):
        builder.check_can_debootstrap()
    monkeypatch.setattr(builder.os, "geteuid", lambda: 1000)
    with pytest.raises(builder.BuildError, match="needs root"):
        builder.check_can_debootstrap()

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no.sock")
    with pytest.raises(builder.BuildError, match="Docker engine is not reachable"):
        builder.connect()


def test_ca_bundle_and_sources(tmp_path):
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        pems = builder.read_ca_bundle(bundle)
        assert pems and all(p.startswith("-----BEGIN CERTIFICATE-----") for p in pems)
        assert builder.ca_fingerprint(pems) == builder.ca_fingerprint(list(pems))
    assert builder.ca_fingerprint([]) == "none"
    assert builder.security_source(builder.BuildOptions()) == builder.DEFAULT_SECURITY_MIRROR
    assert builder.security_source(builder.BuildOptions(mirror="http://mirror.lab/debian")) == ""
    assert builder.security_source(builder.BuildOptions(security_mirror="none")) == ""
    opts = builder.BuildOptions(mirror="http://mirror.lab/debian", security_mirror="http://mirror.lab/sec/")
    assert builder.security_source(opts) == "http://mirror.lab/sec"
