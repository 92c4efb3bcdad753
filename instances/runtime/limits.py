"""Whole-instance limits for the process runtime: process count, CPU and memory.

A fork bomb or a busy loop in one instance must hurt only that instance. The mechanism is
the best this machine offers, chosen once per runtime object and shown on the instance page
(`Limits.describe()`):

  cgroup v2  a writable delegated subtree with the cpu, pids and memory controllers:
             one cgroup per instance with `cpu.max`, `pids.max`, `memory.max` (+ swap 0)
  cgroup v1  writable cpu, pids and memory hierarchies (e.g. a hybrid systemd host, or
             the manager as root in a container): `cpu.cfs_quota_us`, `pids.max`,
             `memory.limit_in_bytes` (+ `memory.memsw.limit_in_bytes` when swap is accounted)
  rlimit     neither: RLIMIT_NPROC for the instance's user (it counts every process and
             thread of that uid, which only this instance uses) and a lower priority (nice);
             CPU time is not capped

Instance cgroups live in `otree-lab-<manager id>/<instance>` (builds: `build-<slot uid>`)
beside the manager: under its OWN cgroup in each v1 hierarchy (the unit's cgroup that
systemd delegates with `Delegate=yes`, or whatever cgroup the manager was started in); in
v2, where a cgroup with processes cannot hand controllers to children ("no internal
processes"), under the unit when systemd keeps the manager in a leaf `<unit>/manager`
(`DelegateSubgroup=manager`, systemd >= 254), else, as root, at the hierarchy's root as
Docker's cgroupfs driver does. Their paths are recorded by the caller (in the root-owned
instance.json) so a manager started elsewhere later still finds and removes them. The
supervisor (procsup.py) joins them itself before it starts anything (writing its pid into
`cgroup.procs`), so every process of the instance is inside; one-off programs (builds,
the settings reader, backups) join through procsup's `exec` mode.

Per-process address-space limits (RLIMIT_AS) are kept in every mode (procsup sets them).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

CONTROLLERS = ("cpu", "pids", "memory")
CPU_PERIOD_US = 100_000
NICE = 10  # tenants yield to the manager when CPU time is not capped
MANAGER_LEAF = "manager"  # cgroup v2: the manager's own leaf in its unit (systemd DelegateSubgroup=manager)


@dataclass(frozen=True)
class Amounts:
    """Limits of one cgroup (an instance or a build)."""

    pids: int
    cpus: float  # 0: not limited
    memory_mb: int  # 0: not limited


@dataclass
class Limits:
    """The mechanism available here and how to apply it. `kind` is "v2", "v1" or "rlimit";
    `why` says why a better one is not available (for the page)."""

    kind: str
    bases: dict[str, str] = field(default_factory=dict)  # v1: controller -> base dir; v2: {"unified": base}
    why: str = ""

    # --- discovery --------------------------------------------------------------------------

    @classmethod
    def detect(cls, manager_id: str, *, force: str = "", proc: dict | None = None) -> "Limits":
        """The best mechanism for this manager's cgroups (`force`: "v2", "v1" or "rlimit";
        `proc`: {"cgroup", "mountinfo"} texts instead of this process's, for tests)."""
        proc = proc or {}
        reasons = []
        if force in ("", "v2"):
            found, why = _detect_v2(manager_id, proc)
            if found is not None:
                return found
            reasons.append(why)
        if force in ("", "v1"):
            found, why = _detect_v1(manager_id, proc)
            if found is not None:
                return found
            reasons.append(why)
        return cls("rlimit", why="; ".join(r for r in reasons if r) or "forced")

    # --- cgroups --------------------------------------------------------------------------

    def dirs(self, leaf: str) -> list[str]:
        """The cgroup folders of `leaf` (e.g. the instance's name, "build-3"), one per hierarchy."""
        return [os.path.join(base, leaf) for base in self.bases.values()]

    def apply(self, dirs: list[str], amounts: Amounts) -> None:
        """Create the cgroups `dirs` (recorded earlier or from `dirs()`) and write their limits.
        Raises OSError when the hierarchy went away (e.g. cgroups were remounted)."""
        if self.kind == "rlimit":
            return
        if self.kind == "v2":
            manager_folder_v2(self)  # the controllers handed on to the instances' cgroups
        for path in dirs:
            os.makedirs(path, mode=0o755, exist_ok=True)
            controller = self._controller_of(path)
            if self.kind == "v2":
                _write(path, "pids.max", str(amounts.pids))
                _write(path, "cpu.max", f"{int(amounts.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}" if amounts.cpus > 0
                       else f"max {CPU_PERIOD_US}")
                _write(path, "memory.max", str(amounts.memory_mb * 2**20) if amounts.memory_mb else "max")
                if os.path.exists(os.path.join(path, "memory.swap.max")):
                    _write(path, "memory.swap.max", "0")
            elif controller == "pids":
                _write(path, "pids.max", str(amounts.pids))
            elif controller == "cpu":
                _write(path, "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(path, "cpu.cfs_quota_us", str(int(amounts.cpus * CPU_PERIOD_US)) if amounts.cpus > 0 else "-1")
            elif controller == "memory":
                _set_v1_memory(path, amounts.memory_mb * 2**20 if amounts.memory_mb else -1)

    def _controller_of(self, path: str) -> str:
        for controller, base in self.bases.items():
            if path.startswith(base + os.sep):
                return controller
        return ""

    @staticmethod
    def remove(dirs: list[str]) -> list[str]:
        """Remove the (empty: nothing runs in them any more) cgroups `dirs` and their
        manager folder when it is empty; returns those that could not be removed."""
        left = []
        for path in dirs:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(path)
                continue
            try:
                os.rmdir(os.path.dirname(path))  # the manager's folder, once empty
            except OSError:
                pass
        return left

    @staticmethod
    def members(dirs: list[str]) -> set[int]:
        """Pids in the cgroups `dirs`."""
        pids = set()
        for path in dirs:
            try:
                with open(os.path.join(path, "cgroup.procs")) as fh:
                    pids.update(int(line) for line in fh if line.strip())
            except (OSError, ValueError):
                pass
        return pids

    def throttled(self, dirs: list[str]) -> int | None:
        """How often the CPU limit held the cgroup back (cpu.stat nr_throttled); None without one."""
        for path in dirs:
            if self.kind == "v2" or self._controller_of(path) == "cpu":
                try:
                    text = Path(path, "cpu.stat").read_text()
                except OSError:
                    return None
                found = re.search(r"^nr_throttled (\d+)$", text, re.M)
                return int(found.group(1)) if found else None
        return None

    # --- for the page -----------------------------------------------------------------------

    def describe(self) -> dict[str, str]:
        """{"cpu", "pids", "memory"}: how each is limited, one phrase each."""
        if self.kind == "v2":
            return {"cpu": "cgroup v2 cpu.max", "pids": "cgroup v2 pids.max", "memory": "cgroup v2 memory.max"}
        if self.kind == "v1":
            return {"cpu": "cgroup v1 CPU quota (cpu.cfs_quota_us)", "pids": "cgroup v1 pids.max",
                    "memory": "cgroup v1 memory.limit_in_bytes"}
        return {"cpu": "", "pids": "RLIMIT_NPROC for the instance's user (processes and threads)", "memory": ""}


# --- helpers ------------------------------------------------------------------------------------

def _write(folder: str, name: str, value: str) -> None:
    with open(os.path.join(folder, name), "w") as fh:
        fh.write(value)


def _set_v1_memory(path: str, limit: int) -> None:
    """memory.limit_in_bytes, and the same for memory+swap when swap is accounted (no swap).
    The kernel wants memsw >= limit at every moment: raise memsw first, lower it last."""
    swap = os.path.join(path, "memory.memsw.limit_in_bytes")
    try:
        _write(path, "memory.limit_in_bytes", str(limit))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return  # lower than what the instance uses now: the old limit stays until it uses less
        if exc.errno != errno.EINVAL or not os.path.exists(swap):
            raise
        _write(path, "memory.memsw.limit_in_bytes", str(limit))
        _write(path, "memory.limit_in_bytes", str(limit))
        return
    if os.path.exists(swap):
        try:
            _write(path, "memory.memsw.limit_in_bytes", str(limit))
        except OSError:
            pass  # swap accounting present but not adjustable: the memory limit holds


def own_cgroups(text: str | None = None) -> dict[str, str]:
    """This process's cgroup per hierarchy ({"cpu": "/a/b", ..., "": "/x"} for v2) from /proc/self/cgroup."""
    if text is None:
        try:
            text = Path("/proc/self/cgroup").read_text()
        except OSError:
            return {}
    found = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            found[controller] = parts[2]
    return found


def mounts(text: str | None = None) -> list[tuple[str, str, str, set[str]]]:
    """(mount point, root within the hierarchy, fstype, options) of every cgroup mount."""
    if text is None:
        try:
            text = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return []
    found = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        found.append((_unescape(fields[4]), _unescape(fields[3]), tail[0], set(tail[2].split(","))))
    return found


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _inside(mount_point: str, mount_root: str, own: str) -> str | None:
    """Where cgroup `own` (a path in the hierarchy) appears under a mount of `mount_root`."""
    own = own or "/"
    if mount_root != "/" and own != mount_root and not own.startswith(mount_root.rstrip("/") + "/"):
        return None
    rel = own[len(mount_root):] if mount_root != "/" else own
    return os.path.normpath(mount_point + "/" + rel.lstrip("/"))


def _detect_v1(manager_id: str, proc: dict) -> tuple[Limits | None, str]:
    if os.geteuid() != 0:
        return None, "cgroup v1 needs root"
    own = own_cgroups(proc.get("cgroup"))
    bases = {}
    for point, root, fstype, options in mounts(proc.get("mountinfo")):
        if fstype != "cgroup":
            continue
        for controller in CONTROLLERS:
            if controller in options and controller not in bases and controller in own:
                where = _inside(point, root, own[controller])
                if where and os.access(where, os.W_OK):
                    bases[controller] = os.path.join(where, f"otree-lab-{manager_id}")
    missing = [c for c in CONTROLLERS if c not in bases]
    if missing:
        return None, f"no writable cgroup v1 {', '.join(missing)} hierarchy"
    return Limits("v1", bases), ""


def _detect_v2(manager_id: str, proc: dict) -> tuple[Limits | None, str]:
    own = own_cgroups(proc.get("cgroup")).get("")
    unified = [(point, root) for point, root, fstype, _ in mounts(proc.get("mountinfo")) if fstype == "cgroup2"]
    if own is None or not unified:
        return None, "no cgroup v2 hierarchy"
    point, mount_root = unified[0]
    where = _inside(point, mount_root, own)
    candidates = []
    if where is not None and os.path.basename(where) == MANAGER_LEAF:
        candidates.append(os.path.dirname(where))  # systemd's DelegateSubgroup=manager: the unit's subtree
    if os.geteuid() == 0 and mount_root == "/":
        candidates.append(point)  # the hierarchy's root, as Docker's cgroupfs driver uses it
    reasons = []
    for parent in candidates:
        why = _usable_v2(parent)
        if not why:
            return Limits("v2", {"unified": os.path.join(parent, f"otree-lab-{manager_id}")}), ""
        reasons.append(why)
    return None, ("; ".join(reasons)
                  or "no delegated cgroup v2 subtree (systemd: Delegate=yes, DelegateSubgroup=manager)")


def _usable_v2(parent: str) -> str:
    """'' when `parent` can hand cpu, pids and memory to the manager's folder in it, else
    why not. Reads only: the controllers are handed on when limits are applied."""
    try:
        available = set(Path(parent, "cgroup.controllers").read_text().split())
    except OSError:
        return "cgroup v2 controllers unreadable"
    if not set(CONTROLLERS) <= available:
        return f"cgroup v2 has no {', '.join(c for c in CONTROLLERS if c not in available)} controller here"
    if not os.access(os.path.join(parent, "cgroup.subtree_control"), os.W_OK):
        return "the cgroup v2 subtree is not delegated to the manager (systemd: Delegate=yes)"
    if not set(CONTROLLERS) <= _enabled(parent) and os.path.exists(os.path.join(parent, "cgroup.type")):
        try:  # a non-root cgroup with processes cannot hand on controllers ("no internal processes")
            if Path(parent, "cgroup.procs").read_text().split():
                return f"{parent} holds processes, so it cannot hand controllers to the instances"
        except OSError:
            return "cgroup v2 processes unreadable"
    return ""


def _enable_v2(parent: str) -> None:
    """cpu, pids and memory for the children of `parent`."""
    if not set(CONTROLLERS) <= _enabled(parent):
        _write(parent, "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))


def _enabled(folder: str) -> set[str]:
    """The controllers a v2 cgroup hands to its children."""
    try:
        return {c.lstrip("+") for c in Path(folder, "cgroup.subtree_control").read_text().split()}
    except FileNotFoundError:
        return set()


def manager_folder_v2(limits: Limits) -> str | None:
    """The per-manager folder of a v2 tree, with the controllers handed on to instance cgroups."""
    base = limits.bases.get("unified")
    if not base:
        return None
    _enable_v2(os.path.dirname(base))
    os.makedirs(base, exist_ok=True)
    if not set(CONTROLLERS) <= _enabled(base):
        _write(base, "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
    return base
