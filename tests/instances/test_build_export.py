"""Unpacking a pushed commit for the build: safe on every supported Python (Debian 12's
3.11.2 has no tarfile "data" filter, so the same checks run by hand there)."""

import os
import subprocess
import tarfile

import pytest

from instances.build import BuildFailed, export_tree

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def commit(tmp_path, files, links=()):
    work = tmp_path / "work"
    work.mkdir()
    run = lambda *a: subprocess.run(["git", *a], cwd=work, env=GIT_ENV, check=True, capture_output=True)  # noqa: E731
    run("init", "-q", "-b", "main")
    for rel, content in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(content)
    for rel, target in links:
        os.symlink(target, work / rel)
    run("add", "-A")
    run("commit", "-q", "-m", "x")
    return work, subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True,
                                check=True).stdout.strip()


# Both ways where this Python has the filter; only the by-hand way where it has not.
MODES = ["by hand"] + (["data filter"] if hasattr(tarfile, "data_filter") else [])


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    if request.param == "by hand":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return request.param


def test_files_and_inner_links_are_unpacked(tmp_path, mode):
    repo, sha = commit(tmp_path, {"settings.py": "X = 1\n", "app/page.html": "<p>hi</p>\n"},
                       links=[("alias.py", "settings.py")])
    dest = tmp_path / "out"
    dest.mkdir()
    export_tree(repo / ".git", sha, dest)
    assert (dest / "settings.py").read_text() == "X = 1\n"
    assert (dest / "app/page.html").exists() and (dest / "alias.py").read_text() == "X = 1\n"
    assert not (dest / ".git").exists()


def test_a_link_out_of_the_project_is_refused(tmp_path, mode):
    repo, sha = commit(tmp_path, {"settings.py": "X = 1\n"}, links=[("secrets", "/etc/passwd")])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(BuildFailed, match="cannot be unpacked"):
        export_tree(repo / ".git", sha, dest)


def _zeros_commit(tmp_path, sizes_mb):
    """A commit of files of zeros (megabytes unpacked, kilobytes in git)."""
    work = tmp_path / "work"
    work.mkdir()
    run = lambda *a: subprocess.run(["git", *a], cwd=work, env=GIT_ENV, check=True, capture_output=True)  # noqa: E731
    run("init", "-q", "-b", "main")
    (work / "settings.py").write_text("X = 1\n")
    for n, mb in enumerate(sizes_mb):
        with open(work / f"zeros{n}.bin", "wb") as fh:
            fh.write(f"file {n}".encode())
            fh.truncate(int(mb * 2**20))
    run("add", "-A")
    run("commit", "-q", "-m", "x")
    return work, subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True,
                                check=True).stdout.strip()


def test_export_streams_and_stops_at_the_deploy_limit(tmp_path, mode):
    """A tree over the limit (here 9 MB of files in a tiny repository) fails with the limit
    named, after unpacking no more than the limit."""
    repo, sha = _zeros_commit(tmp_path, [3, 3, 3])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(BuildFailed, match=r"add up to more than 4 MB, the most this lab deploys \(LAB_DEPLOY_MAX_MB\)"):
        export_tree(repo / ".git", sha, dest, limit=4 * 2**20)
    unpacked = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert unpacked <= 4 * 2**20


def test_export_never_holds_the_archive_in_memory(tmp_path):
    """120 MB of zeros (a few hundred kB in git) unpack with the exporting process's peak
    memory growing by far less than that."""
    import sys

    from django.conf import settings

    repo, sha = _zeros_commit(tmp_path, [40, 40, 40])
    dest = tmp_path / "out"
    dest.mkdir()
    code = ("import django, resource, sys; django.setup(); from pathlib import Path;"
            "from instances.build import export_tree;"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "export_tree(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), limit=256 * 2**20);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    result = subprocess.run([sys.executable, "-c", code, str(repo / ".git"), sha, str(dest)], cwd=settings.BASE_DIR,
                            env={**os.environ, "DJANGO_SETTINGS_MODULE": "manager.settings"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sum(p.stat().st_size for p in dest.iterdir()) > 120 * 2**20
    assert int(result.stdout.split()[-1]) < 24 * 1024  # kB of peak growth


def test_export_of_a_missing_commit_names_gits_reason(tmp_path, mode):
    repo, _ = commit(tmp_path, {"settings.py": "X = 1\n"})
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(BuildFailed, match="git archive"):
        export_tree(repo / ".git", "f" * 40, dest)
