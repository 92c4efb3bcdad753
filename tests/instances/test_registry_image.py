"""The registry image (LAB_IMAGE_REGISTRY, built by `manage.py build_images`; the tests never
build it): what the swarm runtime relies on. A container of it, published on a loopback
port, takes a push from this Docker engine (which speaks plain HTTP to 127.0.0.0/8
registries), gives the same image back to a pull, deletes a manifest and collects its
garbage; it runs as a non-root user, keeps its data in its volume, logs to stdout and turns
healthy.

Everything a test creates (container, volume, image tags) carries this run's name or label
and is removed at the end, whatever failed. Waits are bounded.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest
from django.conf import settings

from instances.images import builder
from tests.conftest import need
from tests.waits import wait_until

RUN = uuid.uuid4().hex[:10]
TEST_LABEL = "org.otree-lab.test-registry"
NAME = f"regt-{RUN}"  # container, volume and repository names
REGISTRY, REDIS = settings.LAB_IMAGE_REGISTRY, settings.LAB_IMAGE_REDIS
DATA = "/var/lib/docker-registry"
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def _engine():
    try:
        import docker

        client = docker.from_env(timeout=300)
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
        for volume in client.volumes.list(filters={"label": f"{TEST_LABEL}={RUN}"}):
            volume.remove(force=True)
        client.close()


@pytest.fixture
def registry(engine):
    """A running container of the registry image on a named volume, published on a free
    loopback port; yields (container, port). Removes container, volume and every tag
    that names the registry's port afterwards."""
    need(builder.image_exists(engine, REGISTRY), f"the image {REGISTRY} (python manage.py build_images)")
    volume = engine.volumes.create(f"{NAME}-data", labels={TEST_LABEL: RUN})
    container = None
    port = None
    try:
        container = engine.containers.run(
            REGISTRY, detach=True, name=NAME, labels={TEST_LABEL: RUN},
            volumes={volume.name: {"bind": DATA, "mode": "rw"}},
            ports={"5000/tcp": ("127.0.0.1", None)},  # the engine picks a free port
        )
        container.reload()
        port = int(container.attrs["NetworkSettings"]["Ports"]["5000/tcp"][0]["HostPort"])
        yield container, port
    finally:
        if port is not None:
            for image in engine.images.list():
                for tag in image.tags:
                    if tag.startswith(f"127.0.0.1:{port}/{NAME}/"):
                        engine.images.remove(tag)  # an untag: the image stays under its own name
        if container is not None:
            container.remove(force=True, v=True)
        volume.remove(force=True)


def http(port: int, method: str, path: str, accept: str = "") -> tuple[int, dict, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def exec_out(container, cmd) -> tuple[int, str]:
    result = container.exec_run(cmd)
    return result.exit_code, result.output.decode(errors="replace").strip()


def stream_ok(lines) -> list[dict]:
    """The progress of a push or pull; fails on its first error."""
    seen = []
    for line in lines:
        assert "error" not in line, line
        seen.append(line)
    return seen


def blob_count(container) -> int:
    code, out = exec_out(container, ["find", f"{DATA}/docker/registry/v2/blobs", "-name", "data", "-type", "f"])
    assert code == 0, out
    return len(out.split())


@pytest.mark.docker
def test_registry_push_pull_delete_as_non_root(engine, registry):
    container, port = registry
    need(builder.image_exists(engine, REDIS), f"the image {REDIS} (python manage.py build_images)")
    source = engine.images.get(REDIS)

    # The health endpoint: GET /v2/ answers 200 (the API version header says which API).
    status, headers, _ = wait_until(lambda: (r := http(port, "GET", "/v2/"))[0] == 200 and r, 60, 0.1,
                                    "GET /v2/ answering 200", ignore=(OSError,))
    assert headers.get("Docker-Distribution-Api-Version") == "registry/2.0"

    # Push a local image, drop the local tag, pull it back: the same image.
    repository = f"127.0.0.1:{port}/{NAME}/redis"
    assert source.tag(repository, "t")
    stream_ok(engine.images.push(repository, "t", stream=True, decode=True))
    status, _, body = http(port, "GET", f"/v2/{NAME}/redis/tags/list")
    assert (status, json.loads(body)) == (200, {"name": f"{NAME}/redis", "tags": ["t"]})
    engine.images.remove(f"{repository}:t")
    assert f"{repository}:t" not in engine.images.get(REDIS).tags
    pulled = engine.images.pull(repository, tag="t")
    assert pulled.id == source.id
    assert f"{repository}:t" in engine.images.get(REDIS).tags

    # The data is in the volume.
    code, out = exec_out(container, ["ls", f"{DATA}/docker/registry/v2/repositories/{NAME}"])
    assert (code, out) == (0, "redis")
    blobs = blob_count(container)
    assert blobs >= 2  # a config and at least one layer

    # Not root: the image's user, and the registry process as the host sees it.
    container.reload()
    assert container.attrs["Config"]["User"] == "docker-registry:docker-registry"
    top = container.top(ps_args="-o pid,uid,args")  # docker top needs the pid column
    rows = [dict(zip(top["Titles"], row)) for row in top["Processes"]]
    servers = [row for row in rows if "docker-registry serve" in row.get("COMMAND", "")]
    assert len(servers) == 1, rows
    assert servers[0]["UID"] == "999", rows
    assert exec_out(container, ["stat", "-c", "%U %u", "/proc/1"]) == (0, "docker-registry 999")
    assert exec_out(container, ["id", "-u"]) == (0, "999")

    # Logs on stdout (the registry itself writes them to stderr).
    stdout = container.logs(stdout=True, stderr=False).decode(errors="replace")
    assert "listening on" in stdout, stdout[-2000:]
    assert container.logs(stdout=False, stderr=True) == b""

    # Deletes are enabled: an old release's manifest goes, and garbage-collect frees its blobs.
    status, headers, _ = http(port, "HEAD", f"/v2/{NAME}/redis/manifests/t", accept=MANIFEST_V2)
    digest = headers.get("Docker-Content-Digest", "")
    assert status == 200 and digest.startswith("sha256:"), headers
    status, _, body = http(port, "DELETE", f"/v2/{NAME}/redis/manifests/{digest}")
    assert status == 202, body
    assert http(port, "GET", f"/v2/{NAME}/redis/manifests/t", accept=MANIFEST_V2)[0] == 404
    code, out = exec_out(container, ["docker-registry", "garbage-collect", "/etc/docker/registry/config.yml"])
    assert code == 0, out
    assert blob_count(container) == 0, out

    # The image's HEALTHCHECK turns the container healthy (Docker 20.10: after one interval).
    def healthy():
        container.reload()
        return container.attrs["State"].get("Health", {}).get("Status") == "healthy"

    wait_until(healthy, 30, 0.5, lambda: f"health {container.attrs['State'].get('Health')}")
