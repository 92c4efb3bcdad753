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
