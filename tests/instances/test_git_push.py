"""Git intake with real git clients: HTTPS (daphne serving the manager) and SSH (the
manager's own SSH server), both as subprocesses on the test database.

The build itself is the release pipeline's business (tested there): here the test plays
the build worker, writing log text and the outcome into the Release row that the real
`record_push` created, and checks that the push's own output shows it live.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings

from instances.git.archive import ensure_repo
from instances.git.repos import repo_path
from instances.models import Instance, Release
from manager.accounts import services
from manager.accounts.models import SSHKey, User
from tests.http_helpers import raw_exchange
from tests.labserver_helpers import BASE_DIR, free_port
from tests.db_helpers import database_url
from tests.waits import wait_until

pytestmark = pytest.mark.slow

PUSH_MAX_MB = 1
BLOB_MAX_MB = 2  # LAB_PUSH_MAX_BLOB_MB of the servers
DEPLOY_MAX_MB = 5  # LAB_DEPLOY_MAX_MB of the servers
INSTANCE_PORT = 18777


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    import socket

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{proc.stdout.read().decode()}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout, 0.1, f"{what} listening on {port}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class Servers:
    def __init__(self, http_port: int, ssh_port: int):
        self.http_port = http_port
        self.ssh_port = ssh_port
        self.http = f"http://127.0.0.1:{http_port}"


@pytest.fixture(scope="module")
def servers(django_db_setup, django_db_blocker, redis_server):
    http_port, ssh_port = free_port(), free_port()
    env = dict(os.environ)
    env.update(
        LAB_DATA_DIR=str(settings.DATA_DIR), DATABASE_URL=database_url(),
        LAB_HOST="127.0.0.1", LAB_PORT=str(http_port), LAB_SSH_PORT=str(ssh_port),
        LAB_PUSH_MAX_MB=str(PUSH_MAX_MB), LAB_PUSH_MAX_BLOB_MB=str(BLOB_MAX_MB), LAB_DEPLOY_MAX_MB=str(DEPLOY_MAX_MB),
        PYTHONUNBUFFERED="1", DJANGO_SETTINGS_MODULE="manager.settings",
    )
    for key in ("LAB_PUBLIC_HOST", "LAB_PUBLIC_URL", "REDIS_URL"):
        env.pop(key, None)
    procs = []
    try:
        web = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(http_port),
                                "manager.asgi:application"], cwd=BASE_DIR, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(web)
        sshd = subprocess.Popen([sys.executable, "manage.py", "git_sshd"], cwd=BASE_DIR, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(sshd)
        _wait_port(http_port, web, "daphne")
        _wait_port(ssh_port, sshd, "git_sshd")
        yield Servers(http_port, ssh_port)
    finally:
        for proc in procs:
            _stop(proc)
        # The builds record_push enqueued have no worker here: leave no tasks behind.
        from manager.celery import app

        with django_db_blocker.unblock():
            app.control.purge()


@pytest.fixture
def lab(transactional_db, servers, tmp_path, ann, bob, boss):
    instance = Instance.objects.create(name="ann-study", owner=ann, public_port=INSTANCE_PORT)
    tokens = {u.username: services.create_token(u, name="git")[1] for u in (ann, bob, boss)}
    home = tmp_path / "home"
    home.mkdir()
    keys = {}
    for user in (ann, bob):
        key = tmp_path / f"id_{user.username}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", user.username, "-f", str(key)],
                       check=True, timeout=30)
        services.add_ssh_key(user, title="laptop", key=key.with_suffix(".pub").read_text())
        keys[user.username] = key
    stranger = tmp_path / "id_stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True, timeout=30)
    keys["stranger"] = stranger
    yield Lab(servers, tmp_path, home, instance, tokens, keys)
    import shutil

    shutil.rmtree(repo_path(instance), ignore_errors=True)


class Lab:
    def __init__(self, servers, tmp, home, instance, tokens, keys):
        self.servers, self.tmp, self.home, self.instance = servers, tmp, home, instance
        self.tokens, self.keys = tokens, keys

    def env(self, key: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(HOME=str(self.home), GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0", LC_ALL="C",
                   GIT_AUTHOR_NAME="Ann A", GIT_AUTHOR_EMAIL="ann@lab.test",
                   GIT_COMMITTER_NAME="Ann A", GIT_COMMITTER_EMAIL="ann@lab.test")
        if key:
            env["GIT_SSH_COMMAND"] = self.ssh_command(key)
        return env

    def ssh_command(self, key: str) -> str:
        return (f"ssh -i {self.keys[key]} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
                f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes")

    def https_url(self, user: str, token: str | None = None) -> str:
        return f"http://{user}:{token or self.tokens[user]}@127.0.0.1:{self.servers.http_port}/git/ann-study.git"

    def ssh_url(self, name: str = "ann-study") -> str:
        return f"ssh://git@127.0.0.1:{self.servers.ssh_port}/{name}.git"

    def project(self, big_mb: float = 0) -> Path:
        work = self.tmp / "project"
        if not work.exists():
            subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True, env=self.env(), timeout=30)
        (work / "settings.py").write_text(f"SESSION_CONFIGS = []  # {time.time()}\n")
        if big_mb:
            (work / "data.bin").write_bytes(os.urandom(int(big_mb * 1024 * 1024)))
        subprocess.run(["git", "add", "-A"], cwd=work, check=True, env=self.env(), timeout=30)
        subprocess.run(["git", "commit", "-q", "-m", "Public goods game, first round"], cwd=work, check=True,
                       env=self.env(), timeout=30)
        return work

    def head(self) -> str:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=self.tmp / "project", capture_output=True,
                              text=True, check=True).stdout.strip()

    def push(self, url: str, refspec: str = "main", key: str | None = None, timeout: float = 90):
        return subprocess.Popen(["git", "push", "--progress", url, refspec], cwd=self.tmp / "project",
                                env=self.env(key), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def refs(self) -> str:
        path = repo_path(self.instance)
        if not path.exists():
            return ""
        return subprocess.run(["git", "for-each-ref"], cwd=path, capture_output=True, text=True).stdout

    def object_count(self) -> int:
        path = repo_path(self.instance)
        if not path.exists():
            return 0
        out = subprocess.run(["git", "count-objects", "-v"], cwd=path, capture_output=True, text=True).stdout
        values = dict(line.split(": ") for line in out.splitlines())
        return int(values["count"]) + int(values["in-pack"])


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # git and its helpers (remote-curl, ssh)
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(f"git did not finish within {timeout} s:\n{out}") from None
    return proc.returncode, out


def play_build(lab: Lab, proc: subprocess.Popen, *, outcome: str = "live", reason: str = "",
               timeout: float = 60) -> Release:
    """Be the build worker: wait for the queued release, write its log in steps, finish it."""

    def git_said() -> str:
        code, out = finish(proc)
        return f"git exited {code}:\n{out}"

    def recorded():
        release = Release.objects.filter(instance=lab.instance).order_by("-number").first()
        if release is None and proc.poll() is not None:
            raise AssertionError(f"no release was recorded ({git_said()})")
        return release

    release = wait_until(recorded, timeout, 0.1, lambda: f"a release recorded ({git_said()})")
    assert release.status == Release.Status.QUEUED
    Release.objects.filter(pk=release.pk).update(status=Release.Status.BUILDING, log="Step 1/2: installing otree\n")
    time.sleep(0.8)  # the hook prints while the build goes on
    Release.objects.filter(pk=release.pk).update(log="Step 1/2: installing otree\nStep 2/2: checking settings.py\n")
    time.sleep(0.5)
    Release.objects.filter(pk=release.pk).update(status=outcome, status_reason=reason)
    return release


def test_https_push_by_owner_deploys_and_streams_the_build(lab):
    lab.project()
    proc = lab.push(lab.https_url("ann"))
    release = play_build(lab, proc)
    code, out = finish(proc)
    assert code == 0, out
    assert "remote: Step 1/2: installing otree" in out
    assert "remote: Step 2/2: checking settings.py" in out
    assert out.count("Step 1/2") == 1  # each log line once, however often it was polled
    assert f"remote: Deployed: {lab.instance.url}" in out and str(INSTANCE_PORT) in lab.instance.url
    assert out.index("Step 2/2") < out.index("Deployed:")
    release.refresh_from_db()
    assert release.commit == lab.head() and release.branch == "main"
    assert release.pushed_by.username == "ann"
    assert release.author == "Ann A <ann@lab.test>" and release.message == "Public goods game, first round"
    assert "refs/heads/main" in lab.refs() and lab.head() in lab.refs()

    # The owner and lab managers fetch over HTTPS too.
    clone = lab.tmp / "clone"
    result = subprocess.run(["git", "clone", "-q", lab.https_url("boss"), str(clone)], env=lab.env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (clone / "settings.py").exists()


def test_failed_deploy_ends_with_the_reason(lab):
    lab.project()
    proc = lab.push(lab.https_url("ann"), "HEAD:master")
    play_build(lab, proc, outcome="failed", reason="requirements.txt: no package named otreee")
    code, out = finish(proc)
    assert "remote: Deploy failed: requirements.txt: no package named otreee" in out
    assert "Deployed:" not in out
    assert "refs/heads/master" in lab.refs()  # the code is stored all the same


def test_https_wrong_or_missing_token_is_refused(lab):
    lab.project()
    code, out = finish(lab.push(lab.https_url("ann", token="olm_not-a-token")))
    assert code != 0 and "Authentication failed" in out
    # ann's valid token with bob's name: still refused
    code, out = finish(lab.push(lab.https_url("bob", token=lab.tokens["ann"])))
    assert code != 0 and "Authentication failed" in out
    assert lab.refs() == "" and lab.object_count() == 0
    import urllib.error
    import urllib.request

    url = f"{lab.servers.http}/git/ann-study.git/info/refs?service=git-receive-pack"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 401 and err.value.headers["WWW-Authenticate"] == 'Basic realm="oTree Lab"'


def test_https_push_by_another_experimenter_is_refused_and_stores_nothing(lab):
    ensure_repo(lab.instance)
    lab.project()
    code, out = finish(lab.push(lab.https_url("bob")))
    assert code != 0
    assert "remote: You may not push to ann-study: only its owner and lab managers may." in out
    assert lab.refs() == "" and lab.object_count() == 0
    assert not Release.objects.exists()
    # an unknown instance: a plain "no such instance"
    bad = lab.https_url("bob").replace("ann-study", "no-such")
    code, out = finish(lab.push(bad))
    assert code != 0 and "There is no instance named no-such." in out


def test_ssh_push_with_the_owners_key_deploys(lab):
    lab.project()
    proc = lab.push(lab.ssh_url(), key="ann")
    play_build(lab, proc)
    code, out = finish(proc)
    assert code == 0, out
    assert "remote: Step 2/2: checking settings.py" in out
    assert f"remote: Deployed: {lab.instance.url}" in out
    assert SSHKey.objects.get(user__username="ann").last_used_at is not None
    assert lab.head() in lab.refs()
    # fetch over SSH (upload-pack), with or without ".git" and leading slash
    clone = lab.tmp / "clone"
    result = subprocess.run(["git", "clone", "-q", lab.ssh_url().removesuffix(".git"), str(clone)],
                            env=lab.env("ann"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_ssh_push_with_another_users_key_is_refused(lab):
    ensure_repo(lab.instance)
    lab.project()
    code, out = finish(lab.push(lab.ssh_url(), key="bob"))
    assert code != 0
    assert "You may not push to ann-study: only its owner and lab managers may." in out
    assert lab.refs() == "" and lab.object_count() == 0
    code, out = finish(lab.push(lab.ssh_url(), key="stranger"))  # a key nobody registered
    assert code != 0 and "Permission denied (publickey)" in out
    User.objects.filter(username="ann").update(is_active=False)  # a deactivated owner's key no longer works
    code, out = finish(lab.push(lab.ssh_url(), key="ann"))
    assert code != 0 and "Permission denied (publickey)" in out
    assert lab.refs() == "" and not Release.objects.exists()


def test_ssh_shell_and_other_commands_are_refused(lab):
    base = ["ssh", *lab.ssh_command("ann").split()[1:], "-p", str(lab.servers.ssh_port), "git@127.0.0.1"]
    result = subprocess.run(base, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "no shell access" in result.stderr + result.stdout
    for command in ("ls -la /", "git-receive-pack '../../etc.git'", "git-upload-pack 'ann-study.git' extra"):
        result = subprocess.run([*base, command], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 1, command
        assert "oTree Lab only runs git push and git fetch here" in result.stderr, result.stderr
    # port forwarding is refused
    result = subprocess.run([*base, "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{free_port()}:127.0.0.1:22"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0


def test_push_to_another_branch_is_stored_not_deployed(lab):
    lab.project()
    code, out = finish(lab.push(lab.ssh_url(), "HEAD:feature", key="ann"))
    assert code == 0, out
    assert "remote: Branch feature stored; only main or master deploy." in out
    assert "refs/heads/feature" in lab.refs()
    assert not Release.objects.exists()


@pytest.mark.parametrize("transport", ["https", "ssh"])
def test_oversize_push_is_refused_naming_the_limit(lab, transport):
    lab.project(big_mb=PUSH_MAX_MB * 1.5)
    url = lab.https_url("ann") if transport == "https" else lab.ssh_url()
    code, out = finish(lab.push(url, key="ann" if transport == "ssh" else None))
    assert code != 0
    assert f"Push refused: it is larger than this lab's limit of {PUSH_MAX_MB} MB (LAB_PUSH_MAX_MB)" in out, out
    assert lab.refs() == "" and not Release.objects.exists()


def test_follow_prints_each_line_once_and_the_outcome_once(instance):
    import io

    from instances.git.hooks import follow

    release = Release.objects.create(instance=instance, number=1, commit="a" * 40, status="failed",
                                     status_reason="boom", log="step 1\nstep 2\nDeploy failed: boom")
    out = io.StringIO()
    assert follow(release, out, poll=0.01, timeout=5) == 1
    assert out.getvalue() == "step 1\nstep 2\nDeploy failed: boom\n"
    Release.objects.filter(pk=release.pk).update(status="building", log="half a li")
    out = io.StringIO()
    assert follow(release, out, poll=0.05, timeout=0.3) == 1
    assert out.getvalue().startswith("[release #1: Building]\nhalf a li\nStill not live after 0 s")


def _hook_client(lab, hook: str, stdin: str, *, token: str, socket_path: str, manage: str,
                 extra_env: dict | None = None) -> tuple[int, str]:
    """Run the hook program as git runs it in the instance's repository."""
    from instances.git.repos import hook_socket_path

    repo = ensure_repo(lab.instance)
    env = {**os.environ, "GIT_DIR": ".", "LAB_PUSH_TOKEN": token,
           "DATABASE_URL": database_url(), **(extra_env or {})}
    script = Path(BASE_DIR) / "instances" / "git" / "hook_client.py"
    result = subprocess.run([sys.executable, "-I", "-S", str(script), hook, socket_path or str(hook_socket_path()),
                             manage], input=stdin, cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def _token(username: str, instance) -> str:
    from instances.git.repos import register_push

    return register_push(User.objects.get(username=username), instance)


def test_hooks_run_in_the_git_service(lab):
    """With the git service running, the hook program needs no Django of its own: a
    manage.py that does not exist is never started, and the answer is the same."""
    code, out = _hook_client(lab, "pre-receive", "", token=_token("bob", lab.instance), socket_path="",
                             manage="/nonexistent/manage.py")
    assert code == 1 and "You may not push to ann-study: only its owner and lab managers may." in out, out
    ann = _token("ann", lab.instance)
    code, out = _hook_client(lab, "pre-receive", "", token=ann, socket_path="", manage="/nonexistent/manage.py")
    assert code == 0 and out == "", out
    # A branch that does not deploy: the post-receive answers through the service too.
    zero = "0" * 40
    code, out = _hook_client(lab, "post-receive", f"{zero} {'b' * 40} refs/heads/feature\n", token=ann,
                             socket_path="", manage="/nonexistent/manage.py")
    assert code == 0 and "Branch feature stored; only main or master deploy." in out, out


def test_hooks_run_in_process_without_the_git_service(lab, tmp_path):
    """No git service listening (e.g. it is restarting): the hook runs `manage.py git_hook`
    itself, with the same answers."""
    missing = str(tmp_path / "no-service.sock")
    code, out = _hook_client(lab, "pre-receive", "", token=_token("bob", lab.instance), socket_path=missing,
                             manage=str(Path(BASE_DIR) / "manage.py"))
    assert code == 1 and "You may not push to ann-study: only its owner and lab managers may." in out, out
    code, out = _hook_client(lab, "pre-receive", "", token=_token("ann", lab.instance), socket_path=missing,
                             manage=str(Path(BASE_DIR) / "manage.py"))
    assert code == 0 and out == "", out


def test_a_pusher_who_leaves_does_not_stop_the_deploy_or_the_service(lab):
    """Ctrl-C during the build: the release goes on; the service answers the next push."""
    lab.project()
    proc = lab.push(lab.https_url("ann"))
    def recorded() -> bool:
        if Release.objects.filter(instance=lab.instance).exists():
            return True
        assert proc.poll() is None, "no release recorded"  # git ended without one
        return False

    wait_until(recorded, 60, 0.1, "a release recorded")
    os.killpg(proc.pid, signal.SIGINT)  # the pusher's terminal
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        # Twice in full CI runs the git client itself did not end within 30 s of Ctrl-C (cause
        # not found; a client-side matter): the pusher then closes the window.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    release = Release.objects.get(instance=lab.instance)
    assert release.status == Release.Status.QUEUED  # recorded; the build worker will take it
    release.delete()  # (no worker here: play_build below plays it for the next push)
    lab.project()
    proc = lab.push(lab.https_url("ann"))
    second = play_build(lab, proc)
    code, out = finish(proc)
    assert code == 0 and f"as release #{second.number}" in out and "Deployed:" in out, out
    # still the service answering (no fallback possible here)
    assert _hook_client(lab, "pre-receive", "", token=_token("ann", lab.instance), socket_path="",
                        manage="/nonexistent")[0] == 0


# --- who pushes: the one-time push token -------------------------------------------------------

def test_hooks_trust_only_a_live_token_for_their_own_repository(lab, tmp_path):
    """Whoever reaches the hook socket (or runs the hook program) names no account: a user
    id is ignored; a token works once per hook, for its own repository, until revoked."""
    from instances.git.repos import revoke_push

    ann = User.objects.get(username="ann")
    other = Instance.objects.create(name="other-study", owner=ann, public_port=INSTANCE_PORT + 1)
    refused = "You may not push to ann-study: only its owner and lab managers may."
    for socket_path, manage in (("", "/nonexistent/manage.py"),
                                (str(tmp_path / "none.sock"), str(Path(BASE_DIR) / "manage.py"))):
        # the previous version's trusted variable: means nothing now
        code, out = _hook_client(lab, "pre-receive", "", token="", socket_path=socket_path, manage=manage,
                                 extra_env={"LAB_PUSHER_ID": str(ann.pk)})
        assert code == 1 and refused in out, out
        # ann's token for another instance's repository
        code, out = _hook_client(lab, "pre-receive", "", token=_token("ann", other), socket_path=socket_path,
                                 manage=manage)
        assert code == 1 and refused in out, out
        # once per hook
        token = _token("ann", lab.instance)
        assert _hook_client(lab, "pre-receive", "", token=token, socket_path=socket_path, manage=manage)[0] == 0
        code, out = _hook_client(lab, "pre-receive", "", token=token, socket_path=socket_path, manage=manage)
        assert code == 1 and refused in out, out
        # revoked (its git process ended)
        token = _token("ann", lab.instance)
        revoke_push(token)
        code, out = _hook_client(lab, "pre-receive", "", token=token, socket_path=socket_path, manage=manage)
        assert code == 1 and refused in out, out
    other.delete()


def test_the_hook_socket_answers_only_the_managers_own_user(lab, tmp_path):
    """SO_PEERCRED: even if the socket's permissions were opened by mistake, a process of
    another user (here: nobody) is refused before its request is read."""
    import asyncio
    import threading

    from instances.git import hookservice
    from tests.conftest import need

    import shutil
    import tempfile

    need(os.geteuid() == 0, "root (to connect as another user)")
    folder = Path(tempfile.mkdtemp(prefix="lab-hook-sock-"))  # (pytest's tmp_path is closed to others)
    folder.chmod(0o755)
    path = folder / "hooks.sock"
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve():
        asyncio.set_event_loop(loop)

        async def main():
            server = await hookservice.start(path)
            folder.chmod(0o755)  # hookservice.start closes its folder; open it and the socket again, by mistake
            path.chmod(0o666)
            started.set()
            async with server:
                await server.serve_forever()

        try:
            loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        repo = ensure_repo(lab.instance)
        request = (json.dumps({"hook": "pre-receive", "git_dir": str(repo), "token": _token("ann", lab.instance),
                               "stdin": ""}) + "\n")
        client = ("import socket,sys\n"
                  "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.argv[2].encode())\n"
                  "print(s.makefile().read())\n")
        # The client needs only the standard library: the system's Python, which nobody may run
        # (a virtual environment's interpreter may live in root's closed home, e.g. under pyenv).
        python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
        as_nobody = subprocess.run([python, "-I", "-c", client, str(path), request], capture_output=True, text=True,
                                   timeout=30, user=65534, group=65534)
        assert "serves the manager's own git processes only" in as_nobody.stdout, as_nobody
        assert '{"exit": 1}' in as_nobody.stdout
        as_manager = subprocess.run([sys.executable, "-c", client, str(path), request], capture_output=True,
                                    text=True, timeout=30)
        assert '{"exit": 0}' in as_manager.stdout, as_manager
    finally:
        for task in asyncio.all_tasks(loop):
            loop.call_soon_threadsafe(task.cancel)
        thread.join(10)
        shutil.rmtree(folder, ignore_errors=True)


# --- sizes ----------------------------------------------------------------------------------------

def _zeros(path: Path, mb: float, header: str = "") -> None:
    """A file of zeros: megabytes on disk, a few kilobytes in a pack."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(header.encode())
        fh.truncate(int(mb * 1024 * 1024))


@pytest.mark.parametrize("transport", ["https", "ssh"])
def test_a_file_over_the_blob_cap_is_refused_naming_it(lab, transport):
    work = lab.project()
    _zeros(work / "data" / "zeros.bin", 64)  # 64 MB of zeros: ~64 kB packed, far under LAB_PUSH_MAX_MB
    subprocess.run(["git", "add", "-A"], cwd=work, check=True, env=lab.env(), timeout=30)
    subprocess.run(["git", "commit", "-q", "-m", "data"], cwd=work, check=True, env=lab.env(), timeout=30)
    url = lab.https_url("ann") if transport == "https" else lab.ssh_url()
    code, out = finish(lab.push(url, "HEAD:feature", key="ann" if transport == "ssh" else None))
    assert code != 0
    assert (f"Push refused: a file may be at most {BLOB_MAX_MB} MB (LAB_PUSH_MAX_BLOB_MB); "
            "this push brings data/zeros.bin (64 MB)") in out, out
    assert "Nothing was stored." in out
    assert lab.refs() == "" and lab.object_count() == 0 and not Release.objects.exists()


def test_a_main_tree_over_the_deploy_limit_is_refused_other_branches_are_stored(lab):
    work = lab.project()
    for n in range(3):  # 3 x 1.9 MB: each file under the blob cap, together over LAB_DEPLOY_MAX_MB (5)
        _zeros(work / f"media/clip{n}.raw", 1.9, header=f"clip {n}")
    subprocess.run(["git", "add", "-A"], cwd=work, check=True, env=lab.env(), timeout=30)
    subprocess.run(["git", "commit", "-q", "-m", "media"], cwd=work, check=True, env=lab.env(), timeout=30)
    code, out = finish(lab.push(lab.ssh_url(), "HEAD:main", key="ann"))
    assert code != 0
    assert (f"Push refused: the files of main add up to more than {DEPLOY_MAX_MB} MB, the most this lab deploys "
            "(LAB_DEPLOY_MAX_MB)") in out, out
    assert lab.refs() == "" and not Release.objects.exists()
    # Another branch deploys nothing: it is stored.
    code, out = finish(lab.push(lab.https_url("ann"), "HEAD:feature"))
    assert code == 0 and "Branch feature stored" in out, out
    # ... and its objects already stored do not make it deployable.
    code, out = finish(lab.push(lab.https_url("ann"), "HEAD:master"))
    assert code != 0 and "the files of master add up to more than" in out, out
    assert "refs/heads/master" not in lab.refs() and not Release.objects.exists()


def _raw_http(port: int, head: bytes, body_chunks=()) -> tuple[bytes, int]:
    """Send a request (the body in chunks, until the server stops taking it); return the
    answer and how many body bytes went out."""
    return raw_exchange(port, head, body_chunks, limit=65536)


def test_https_bodies_are_capped_while_they_arrive(lab):
    """The web server stops taking a body at its cap (LAB_PUSH_MAX_MB and a quarter for git
    pushes, 16 MB for anything else), before any login, instead of reading it whole."""
    import urllib.request

    port = lab.servers.http_port
    push = b"POST /git/ann-study.git/git-receive-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    # A declared length over the cap: refused before the body is sent.
    answer, _ = _raw_http(port, push + b"Content-Length: 10000000000\r\nExpect: 100-continue\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"A git push may be at most 1 MB (LAB_PUSH_MAX_MB); nothing was stored." in answer
    assert b"100 Continue" not in answer
    # A chunked body: cut off once past the cap (2.25 MB here), not read to its end (64 MB).
    chunk = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
    answer, sent = _raw_http(port, push + b"Transfer-Encoding: chunked\r\n\r\n", (chunk for _ in range(1024)))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 32 * 1024 * 1024
    # Any other page: 16 MB.
    answer, _ = _raw_http(port, b"POST /accounts/login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 20000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    with urllib.request.urlopen(f"{lab.servers.http}/healthz/", timeout=10) as response:
        assert response.status == 200  # the server took no harm
    # A real git client far over the limit: refused, nothing stored.
    lab.project(big_mb=PUSH_MAX_MB * 3)
    code, out = finish(lab.push(lab.https_url("ann")))
    assert code != 0 and "HTTP 413" in out, out  # (git shows "error: RPC failed; HTTP 413")
    assert lab.refs() == "" and not Release.objects.exists()


# --- a repository never outlives its instance ---------------------------------------------------

def _clone(lab, url: str, dest: Path, key: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "clone", url, str(dest)], env=lab.env(key), capture_output=True, text=True,
                          timeout=60)


def _log(path: Path, *args: str) -> list[str]:
    return subprocess.run(["git", "log", "--format=%H", *args], cwd=path, capture_output=True, text=True,
                          check=True, timeout=30).stdout.split()


def test_deleting_an_instance_archives_its_history_and_a_new_namesake_starts_empty(lab):
    from instances import reconciler
    from instances.models import Backup

    work = lab.project()
    first = lab.head()
    code, out = finish(lab.push(lab.ssh_url(), "HEAD:feature", key="ann"))
    assert code == 0, out
    lab.project()  # a second commit, force-pushed over by a third: only the reflog still knows it
    replaced = lab.head()
    assert finish(lab.push(lab.ssh_url(), "HEAD:feature", key="ann"))[0] == 0
    subprocess.run(["git", "reset", "-q", "--hard", first], cwd=work, check=True, env=lab.env(), timeout=30)
    lab.project()
    kept = lab.head()
    assert finish(lab.push(lab.ssh_url(), "+HEAD:feature", key="ann"))[0] == 0
    old_pk = lab.instance.pk

    Instance.objects.filter(pk=old_pk).update(delete_requested=True)
    assert reconciler.reconcile(old_pk) is None
    assert not Instance.objects.filter(pk=old_pk).exists()
    assert not repo_path("ann-study").exists()
    archived = Backup.objects.get(instance_name="ann-study", kind=Backup.Kind.REPOSITORY)
    assert archived.status == Backup.Status.DONE and archived.owner.username == "ann" and archived.instance is None
    assert archived.filename.endswith(".bundle") and archived.size == archived.path.stat().st_size
    # Lab managers see and download it on the Backups page.
    from django.test import Client

    web = Client()
    web.force_login(User.objects.get(username="boss"))
    page = web.get("/backups/").content.decode()
    assert "git history (instance deleted)" in page and "git bundle" in page
    download = web.get(f"/backups/{archived.pk}/download/")
    assert download.status_code == 200
    assert b"".join(download.streaming_content).startswith(b"# v2 git bundle")

    # The name again, for bob: his clone is empty; ann's old history is nowhere to be fetched.
    bob = User.objects.get(username="bob")
    lab.instance = Instance.objects.create(name="ann-study", owner=bob, public_port=INSTANCE_PORT)
    result = _clone(lab, lab.https_url("bob"), lab.tmp / "bob-clone")
    assert result.returncode == 0 and "You appear to have cloned an empty repository" in result.stderr, result
    result = _clone(lab, lab.ssh_url(), lab.tmp / "bob-clone-ssh", key="bob")
    assert result.returncode == 0 and "You appear to have cloned an empty repository" in result.stderr, result
    assert lab.refs() == ""

    # The bundle restores it all, the force-pushed-over commit included.
    restored = lab.tmp / "restored"
    result = subprocess.run(["git", "clone", "-q", "--mirror", str(archived.path), str(restored)], env=lab.env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _log(restored, "refs/heads/feature") == [kept, first]
    assert replaced in _log(restored, "--all")


def test_a_repository_left_by_an_earlier_version_is_never_served_to_a_new_namesake(lab):
    """Before this version, a deleted instance's repository stayed. Whether the name is
    created again, or a push or clone finds it first, or the sweep does: it is archived."""
    from instances import services
    from instances.git import archive
    from instances.models import Backup
    from tests import otree_projects

    def leave_repository(name: str) -> str:
        bare = otree_projects.init_bare(repo_path(name))
        return otree_projects.Checkout(lab.tmp / f"{name}-old-work", bare).push({"settings.py": "OLD = 1\n"}, "old")

    boss = User.objects.get(username="boss")
    # 1. created again through the service
    old = leave_repository("reused-one")
    instance = services.create_instance(boss, name="reused-one", owner="bob")
    assert not repo_path("reused-one").exists()
    row = Backup.objects.get(instance_name="reused-one", kind=Backup.Kind.REPOSITORY)
    assert row.owner is None and row.instance is None
    assert subprocess.run(["git", "bundle", "list-heads", str(row.path)], capture_output=True, text=True,
                          check=True, timeout=30).stdout.startswith(old)
    instance.delete()

    # 2. an instance row made while the old repository was there (the earlier version did that):
    # the repository is older than the instance, so the first clone archives it
    old = leave_repository("reused-two")
    made = time.time() - 10  # its files dated 10 s before the instance (instead of waiting for it)
    for entry in ("description", "HEAD", "config", "objects"):
        os.utime(repo_path("reused-two") / entry, (made, made))
    lab.instance = Instance.objects.create(name="reused-two", owner=User.objects.get(username="bob"))
    url = lab.https_url("bob").replace("ann-study", "reused-two")
    result = _clone(lab, url, lab.tmp / "two")
    assert "You appear to have cloned an empty repository" in result.stderr, result
    assert Backup.objects.filter(instance_name="reused-two", kind=Backup.Kind.REPOSITORY).count() == 1
    # and the new repository is its own from now on (stamped): a second clone finds it as it is
    assert _clone(lab, url, lab.tmp / "two-again").returncode == 0
    assert Backup.objects.filter(instance_name="reused-two", kind=Backup.Kind.REPOSITORY).count() == 1
    # a repository stamped for another instance of the name is archived too
    work = otree_projects.Checkout(lab.tmp / "two-work")
    work.commit({"settings.py": "B = 1\n"}, "b")  # stored behind the hooks' back (a fetch runs none)
    subprocess.run(["git", "--git-dir", str(repo_path("reused-two")), "fetch", "-q", str(work.dir), "main:main"],
                   check=True, timeout=30)
    subprocess.run(["git", "config", "lab.instance", "999999"], cwd=repo_path("reused-two"), check=True)
    result = _clone(lab, url, lab.tmp / "two-third")
    assert "You appear to have cloned an empty repository" in result.stderr, result
    assert Backup.objects.filter(instance_name="reused-two", kind=Backup.Kind.REPOSITORY).count() == 2
    lab.instance.delete()

    # 3. no instance of that name at all: the sweep archives it (and leaves the live ones alone)
    ensure_repo(Instance.objects.get(name="ann-study"))
    leave_repository("gone-for-good")
    assert "gone-for-good" in archive.sweep_orphans(set(Instance.objects.values_list("name", flat=True)))
    assert not repo_path("gone-for-good").exists() and repo_path("ann-study").exists()
    assert Backup.objects.filter(instance_name="gone-for-good", kind=Backup.Kind.REPOSITORY).exists()
