"""netguard: the firewall that keeps the instances' code away from this machine, from
each other and from link-local/metadata addresses (both runtimes).

What an instance's code may reach is a network question the runtimes cannot answer on
their own: a container reaches every service the host binds on 0.0.0.0 through any host
address (its own networks' gateways included, "internal" ones too), and a process
tenant reaches everything on loopback. So the manager keeps a few iptables rules:

- Docker (sources in LAB_DOCKER_SUBNETS, the apps — with the swarm runtime also this
  node's docker_gwbridge, through which its apps leave — and LAB_DOCKER_BUILD_SUBNETS, the
  builds). INPUT, i.e. packets to the host itself, from any bridge: only replies
  (ESTABLISHED,RELATED), and DNS to a resolver that is an address of this machine when
  /etc/resolv.conf names one (Docker 20.10's embedded DNS forwards a container's
  queries from the container's own network namespace, so they arrive like any other
  packet). FORWARD (through DOCKER-USER, which Docker keeps first in FORWARD): replies
  and traffic within one Docker network (Docker's own rules decide there) pass;
  connections Docker address-translated (ports published on a host address, i.e. the
  host's services in other containers), link-local 169.254.0.0/16 and both pools are
  rejected; with LAB_EGRESS=deny the apps' new connections out too, the builds' not
  (pip). Containers have no IPv6 (Docker disables it on networks without IPv6).
- Process runtime (OUTPUT, by owner: the app users LAB_PROCESS_APP_UIDS, the venv
  builders LAB_PROCESS_BUILDER_UIDS): replies pass; DNS to a local resolver named in
  /etc/resolv.conf (apps: only with LAB_EGRESS=open); nothing else to any local address
  (`addrtype LOCAL`: loopback and every host address), nothing to link-local or
  metadata addresses, nothing to the Docker bridges or pools; with LAB_EGRESS=deny the
  apps nothing else new out, the builders may (pip). The same in ip6tables when the
  host has IPv6 (loopback ::1 and the host's v6 addresses are local too).

- Swarm: the apps (docker_gwbridge and the overlays) reach no node of the swarm either
  (`lab_hosts`: their addresses, recorded by the swarm runtime in the data dir); on the
  swarm's other nodes the same rules are kept by instances/node_guard.py (a global service
  the swarm runtime runs there), where only the manager's address (`proxy_from`) reaches
  the apps' published ports and no registry port is open.

Rejections answer at once (ICMP "administratively prohibited": the app's connect fails
with "No route to host" instead of hanging).

Level-triggered: the desired rules are computed from the settings (`Policy`); `ensure()`
reads the filter table (iptables-save, a few ms), and when our chains or their jumps
differ it rewrites them in one atomic `iptables-restore --noflush` transaction that
touches only our own chains and jumps. It runs at labserver start, in the minute sweep
and before an instance is started; it never raises: when it cannot apply the rules (no
root, no iptables) its `Status` says so with what to do, and the instance page reports
the protection as not enforced.

Our chains are named per manager (`LAB-<LAB_MANAGER_ID>-IN|FWD|OUT`), so two managers
(or test runs) on one host coexist; each jump carries a comment with the manager's data
dir, and a manager whose data dir no longer exists (a finished test run, an uninstalled
manager) has its chains removed by the next `ensure()` of any manager. `remove()` takes
one manager's chains away (tests, uninstall: `manage.py firewall --remove`). A manager
in the manager image (the compose install) records its data dir as `container:<path>`:
managers on the host never judge it, and it judges no one's (see `_remove_stale`).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LINK_LOCAL = {4: ("169.254.0.0/16",), 6: ("fe80::/10", "fd00:ec2::254/128")}  # the latter: EC2's IPv6 metadata
REJECT = {4: "REJECT --reject-with icmp-admin-prohibited", 6: "REJECT --reject-with icmp6-adm-prohibited"}
SWARM_BRIDGE = "docker_gwbridge"  # a swarm node's bridge: its tasks' way out and their published ports
DOCKER_BRIDGES = ("docker0", "br-+", SWARM_BRIDGE)  # the default bridge, every user-defined bridge, the swarm's
COMMENT = "otree-lab"
CHAIN = re.compile(r"LAB-([a-z0-9]{1,16})-(IN|FWD|OUT)")
TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
TIMEOUT = 30  # seconds for one iptables call (it waits up to 10 s for the xtables lock)
CONTAINER_PREFIX = "container:"  # a data dir in the manager image's own file system (see _remove_stale)


def in_manager_image() -> bool:
    """The manager runs in its own image (Dockerfile, the compose install)."""
    return bool(os.environ.get("OTREE_LAB_IMAGE"))


@dataclass(frozen=True)
class Policy:
    """What the rules are computed from (`from_settings()` in the manager; tests make their own)."""

    manager_id: str
    app_pools: tuple[str, ...]  # the instances' Docker networks (LAB_DOCKER_SUBNETS)
    build_pools: tuple[str, ...]  # the builds' Docker networks (LAB_DOCKER_BUILD_SUBNETS)
    app_uids: tuple[int, int]  # process runtime: the instances' users (first, last)
    builder_uids: tuple[int, int]  # process runtime: the venv builders
    egress: str = "open"  # open | deny: the apps' new connections to the outside
    swarm_bridge: bool = False  # a swarm node: its apps' published ports answer only this machine
    registry_port: int = 5000  # the lab registry's port in its container (other nodes pull from it); 0: none here
    # A swarm's nodes (their addresses): no app on any node reaches one of them (its engine,
    # the lab's registry, whatever else it serves); on a node that is not the manager's, the
    # addresses that may reach the apps' published ports (the manager's proxy).
    lab_hosts: tuple[str, ...] = ()
    proxy_from: tuple[str, ...] = ()
    data_dir: str = ""  # recorded with the jumps: a manager whose data dir is gone is cleaned up
    resolv_conf: str = "/etc/resolv.conf"

    @classmethod
    def from_settings(cls) -> Policy:
        from django.conf import settings

        return cls(
            manager_id=settings.LAB_MANAGER_ID,
            app_pools=(settings.LAB_DOCKER_SUBNETS, *swarm_pools(settings.LAB_SWARM_SUBNETS)),
            swarm_bridge=bool(swarm_pools()),
            build_pools=(settings.LAB_DOCKER_BUILD_SUBNETS,),
            app_uids=tuple(settings.LAB_PROCESS_APP_UIDS),
            builder_uids=tuple(settings.LAB_PROCESS_BUILDER_UIDS),
            egress=settings.LAB_EGRESS,
            lab_hosts=read_lab_hosts(Path(settings.DATA_DIR)),
            data_dir=(CONTAINER_PREFIX if in_manager_image() else "") + str(settings.DATA_DIR),
        )

    def chain(self, role: str) -> str:
        return f"LAB-{self.manager_id}-{role}"


def swarm_pools(overlays: str = "") -> tuple[str, ...]:
    """When this machine is a swarm node: the subnet of its docker_gwbridge, through which
    the swarm runtime's apps leave (their instance networks are overlays), read from the
    interface (no engine call) — every container there is the swarm's: the apps, and the
    lab's registry, which needs nothing of this machine either — and `overlays`
    (LAB_SWARM_SUBNETS): nothing on this machine may address an instance's overlay (a
    packet to it would leave by the default route)."""
    import psutil

    for addr in psutil.net_if_addrs().get(SWARM_BRIDGE, []):
        if addr.family == socket.AF_INET and addr.netmask:
            bridge = str(ipaddress.ip_interface(f"{addr.address}/{addr.netmask}").network)
            return (bridge, *([overlays] if overlays else []))
    return ()


LAB_HOSTS_FILE = "swarm-nodes"  # in the data dir: the swarm's node addresses, one per line


def read_lab_hosts(data_dir: Path) -> tuple[str, ...]:
    """The swarm's node addresses as the swarm runtime last wrote them (none: not a swarm
    manager). Only valid addresses count."""
    try:
        lines = (data_dir / LAB_HOSTS_FILE).read_text().split()
    except OSError:
        return ()
    hosts = []
    for line in lines:
        try:
            hosts.append(str(ipaddress.ip_address(line)))
        except ValueError:
            continue
    return tuple(sorted(set(hosts)))


def write_lab_hosts(data_dir: Path, hosts) -> bool:
    """Record the swarm's node addresses (atomically); True when they changed."""
    hosts = tuple(sorted({str(ipaddress.ip_address(h)) for h in hosts}))
    if read_lab_hosts(data_dir) == hosts:
        return False
    path = data_dir / LAB_HOSTS_FILE
    tmp = path.with_name(f".{LAB_HOSTS_FILE}.{os.getpid()}")
    tmp.write_text("".join(f"{h}\n" for h in hosts))
    os.replace(tmp, path)
    return True


@dataclass(frozen=True)
class Status:
    """Whether the rules are in place now; `detail` is one sentence (what holds, or why
    not and what to do); `changed`: this call (re)applied them."""

    enforced: bool
    detail: str
    changed: bool = False


class NetguardError(Exception):
    """The rules cannot be read or applied; the message says why and what to do."""


# --- the desired rules ----------------------------------------------------------------------

def _net(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=False))


def _rule(*, src: str = "", dst: str = "", in_if: str = "", out_if: str = "", proto: str = "", owner: tuple[int, int] | None = None,
          dport: int | None = None, state: str = "", local: bool = False, bridged: bool = False, target: str) -> str:
    """One rule, spelled exactly as iptables-save prints it (so "in place" is a plain
    comparison): addresses, interfaces and protocol first, then the matches."""
    parts = []
    if src:
        parts += ["-s", _net(src)]
    if dst:
        parts += ["-d", _net(dst)]
    if in_if:
        parts += ["-i", in_if]
    if out_if:
        parts += ["-o", out_if]
    if proto:
        parts += ["-p", proto]
    if owner:
        first, last = owner
        parts += ["-m", "owner", "--uid-owner", f"{first}-{last}" if last != first else str(first)]
    if dport is not None:
        parts += ["-m", proto, "--dport", str(dport)]
    if bridged:
        parts += ["-m", "physdev", "--physdev-is-bridged"]
    if state:
        parts += ["-m", "conntrack", "--ctstate", state]
    if local:
        parts += ["-m", "addrtype", "--dst-type", "LOCAL"]
    parts += ["-j", target]
    return " ".join(parts)


def local_resolvers(resolv_conf: str = "/etc/resolv.conf") -> dict[int, list[str]]:
    """The nameservers of `resolv_conf` that are addresses of this machine, by family."""
    found: dict[int, list[str]] = {4: [], 6: []}
    try:
        lines = Path(resolv_conf).read_text(errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            addr = ipaddress.ip_address(fields[1].split("%")[0])
        except ValueError:
            continue
        if _is_local(addr) and str(addr) not in found[addr.version]:
            found[addr.version].append(str(addr))
    return found


def _is_local(addr) -> bool:
    """Whether `addr` is an address of this machine (it can be bound)."""
    if addr.is_loopback:
        return True
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(addr), 0))
        return True
    except OSError:
        return False


def desired_chains(policy: Policy, version: int, resolvers: list[str]) -> dict[str, list[str]]:
    """Our chains of one family (4 or 6) and their rules, in order."""
    reject = REJECT[version]
    chains: dict[str, list[str]] = {}
    if version == 4:
        pools = [*policy.app_pools, *policy.build_pools]
        dns_from = [*policy.build_pools, *(policy.app_pools if policy.egress == "open" else ())]
        # The host's own traffic to a gateway address has that source too: not ours to judge.
        inbound = [_rule(in_if="lo", target="RETURN")]
        inbound += [_rule(src=p, state="RELATED,ESTABLISHED", target="RETURN") for p in pools]
        for pool in dns_from:
            for resolver in resolvers:
                if not ipaddress.ip_address(resolver).is_loopback:  # a container's 127.x is its own
                    inbound += [_rule(src=pool, dst=resolver, proto=p, dport=53, target="RETURN") for p in ("udp", "tcp")]
        inbound += [_rule(src=p, target=reject) for p in pools]
        chains[policy.chain("IN")] = inbound
        forward = [_rule(src=p, state="RELATED,ESTABLISHED", target="RETURN") for p in pools]
        forward += [_rule(src=p, bridged=True, target="RETURN") for p in pools]  # within one network: Docker's rules
        forward += [_rule(src=p, state="DNAT", target=reject) for p in pools]  # ports published on the host
        forward += [_rule(src=p, dst=d, target=reject) for p in pools for d in (*LINK_LOCAL[4], *pools)]
        hosts = [h for h in policy.lab_hosts if ipaddress.ip_address(h).version == 4]
        forward += [_rule(src=p, dst=h, target=reject) for p in pools for h in hosts]  # the swarm's nodes
        if policy.egress == "deny":
            forward += [_rule(src=p, target=reject) for p in policy.app_pools]
        if policy.swarm_bridge:
            # Swarm publishes an app's port on every address of its node: from another machine
            # (forwarded, address-translated to a task on docker_gwbridge) only the manager's
            # proxy (`proxy_from`, on the other nodes) and the lab's registry (on the
            # manager's node) answer; the manager reaches its own node's apps over loopback.
            forward += [_rule(src=a, out_if=SWARM_BRIDGE, state="DNAT", target="RETURN") for a in policy.proxy_from]
            if policy.registry_port:
                forward.append(f"-o {SWARM_BRIDGE} -p tcp -m conntrack --ctstate DNAT -m tcp ! --dport "
                               f"{policy.registry_port} -j {reject}")
            else:
                forward.append(_rule(out_if=SWARM_BRIDGE, state="DNAT", target=reject))
        chains[policy.chain("FWD")] = forward
    outbound = []

    def refuse(**kw) -> list[str]:
        # IPv6: TCP gets a reset (an ICMPv6 error to a local or link-local source arrives
        # late or never: the connect would hang); everything else the ICMP error.
        tcp = [_rule(proto="tcp", **kw, target="REJECT --reject-with tcp-reset")] if version == 6 else []
        return tcp + [_rule(**kw, target=reject)]

    for uids, builder in ((policy.app_uids, False), (policy.builder_uids, True)):
        if not uids:  # no such users here (a swarm node: no process runtime)
            continue
        outbound.append(_rule(owner=uids, state="RELATED,ESTABLISHED", target="RETURN"))
        if builder or policy.egress == "open":
            outbound += [_rule(dst=r, proto=p, owner=uids, dport=53, target="RETURN") for r in resolvers
                         for p in ("udp", "tcp")]
        outbound += refuse(owner=uids, local=True)
        for d in LINK_LOCAL[version]:
            outbound += refuse(dst=d, owner=uids)
        for i in DOCKER_BRIDGES:
            outbound += refuse(out_if=i, owner=uids)
        if version == 4:
            outbound += [_rule(dst=p, owner=uids, target=reject) for p in (*policy.app_pools, *policy.build_pools)]
        if not builder and policy.egress == "deny":
            outbound += refuse(owner=uids)
    chains[policy.chain("OUT")] = outbound
    return chains


def _jump_comment(policy: Policy) -> str:
    data_dir = policy.data_dir if policy.data_dir and re.fullmatch(r"[^\"\\\n]{1,200}", policy.data_dir) else "-"
    return f"{COMMENT} {policy.manager_id} {data_dir}"


def desired_jumps(policy: Policy, version: int, docker_user: bool) -> dict[str, str]:
    """{built-in chain: the rule that jumps to ours} (first in that chain)."""
    comment = f'-m comment --comment "{_jump_comment(policy)}"'
    jumps = {"OUTPUT": f"{comment} -j {policy.chain('OUT')}"}
    if version == 4:
        jumps["INPUT"] = f"{comment} -j {policy.chain('IN')}"
        # DOCKER-USER: Docker keeps it first in FORWARD (and recreates the jump at its start).
        jumps["DOCKER-USER" if docker_user else "FORWARD"] = f"{comment} -j {policy.chain('FWD')}"
    return jumps


# --- reading and applying -------------------------------------------------------------------

@dataclass
class Table:
    """The filter table of one family as iptables-save prints it."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # name -> rules (without "-A <name> ")

    @classmethod
    def parse(cls, text: str) -> Table:
        table = cls()
        for line in text.splitlines():
            if line.startswith(":"):
                table.chains.setdefault(line[1:].split()[0], [])
            elif line.startswith("-A "):
                _, name, *rest = line.split(" ", 2)
                table.chains.setdefault(name, []).append(rest[0] if rest else "")
        return table


def ipv6_enabled() -> bool:
    try:
        return bool(Path("/proc/net/if_inet6").read_text().strip())
    except OSError:
        return False


def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        raise NetguardError(f"{name} is not installed (Debian/Ubuntu: apt install iptables)")
    return path


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise NetguardError(f"{Path(argv[0]).name} did not finish within {TIMEOUT} s") from None
    except OSError as exc:
        raise NetguardError(f"{Path(argv[0]).name} cannot run: {exc}") from None
    if proc.returncode != 0:
        text = " ".join((proc.stderr or proc.stdout).split())[:300]
        if os.geteuid() != 0 or "ermission denied" in text:
            raise NetguardError(
                "the manager runs without root and cannot set firewall rules: run `python manage.py firewall` as "
                "root at every boot (the systemd unit's ExecStartPre=+), or run the manager as root")
        raise NetguardError(f"{Path(argv[0]).name} failed: {text}")
    return proc.stdout


def read_table(version: int) -> Table:
    _check_namespace()
    return Table.parse(_run([_tool(TOOLS[version][0]), "-t", "filter"]))


def _check_namespace() -> None:
    """Rules set inside a container without the host's network would guard that container,
    not this machine: refuse to claim anything there."""
    if not os.path.exists("/.dockerenv"):
        return
    try:
        interfaces = os.listdir("/sys/class/net")
    except OSError:
        interfaces = []
    if not any(i in ("docker0", SWARM_BRIDGE) or i.startswith("br-") for i in interfaces):
        raise NetguardError(
            "the manager runs in a container without the host's network, where firewall rules would guard only "
            "that container: run `python manage.py firewall` on the host as root (or the manager with "
            "network_mode: host and the NET_ADMIN capability)")


def _families() -> list[int]:
    return [4, 6] if ipv6_enabled() else [4]


def _plan(policy: Policy, version: int, table: Table, resolvers: dict[int, list[str]]) -> list[str]:
    """The iptables-restore lines that make `table` match the policy ([] when it does)."""
    chains = desired_chains(policy, version, resolvers[version])
    jumps = desired_jumps(policy, version, docker_user="DOCKER-USER" in table.chains)
    ours = {policy.chain(role) for role in ("IN", "FWD", "OUT")}
    lines: list[str] = []
    wrong_chains = [name for name, rules in chains.items() if table.chains.get(name) != rules]
    wrong_jumps = [parent for parent, rule in jumps.items() if not _jump_first(table, parent, rule)]
    strays = [(parent, rule) for parent, rules in table.chains.items() for rule in rules
              if _jump_target(rule) in ours and jumps.get(parent) != rule]
    if not wrong_chains and not wrong_jumps and not strays:
        return []
    for name in chains:
        lines.append(f":{name} - [0:0]")  # declared: created, or flushed when it exists
    for name in ours - set(chains):
        if name in table.chains:
            lines.append(f":{name} - [0:0]")  # a chain this family no longer needs: emptied (deleted below)
    # Every jump to our chains goes, the desired ones come back first in their chain.
    for parent, rules in table.chains.items():
        for rule in rules:
            if _jump_target(rule) in ours:
                lines.append(f"-D {parent} {rule}")
    for name, rules in chains.items():
        lines += [f"-A {name} {rule}" for rule in rules]
    for parent, rule in jumps.items():
        if parent in table.chains:
            lines.append(f"-I {parent} 1 {rule}")
    for name in ours - set(chains):
        if name in table.chains:
            lines.append(f"-X {name}")
    return lines


def _jump_target(rule: str) -> str:
    m = re.search(r"(?:^| )-j (\S+)$", rule)
    return m.group(1) if m else ""


def _jump_first(table: Table, parent: str, rule: str) -> bool:
    """Our jump is in `parent`, after nothing but other managers' jumps (and only once)."""
    rules = table.chains.get(parent)
    if rules is None:
        return True  # no such chain here (e.g. no FORWARD filtering): nothing to jump from
    if rules.count(rule) != 1:
        return False
    before = rules[: rules.index(rule)]
    return all(CHAIN.fullmatch(_jump_target(r)) for r in before)


def _restore(version: int, lines: list[str]) -> None:
    script = "*filter\n" + "\n".join(lines) + "\nCOMMIT\n"
    _run([_tool(TOOLS[version][1]), "--noflush", "--wait", "10"], stdin=script)


def _lock_path() -> Path:
    # /run: only root writes there (a lock in /tmp could be a tenant's planted link).
    if os.access("/run", os.W_OK):
        return Path("/run/otree-lab-netguard.lock")
    return Path(tempfile.gettempdir()) / f"otree-lab-netguard-{os.geteuid()}.lock"


class _Locked:
    """An exclusive lock on this host for the read-modify-write of the rules (two
    managers, or a worker and the labserver, never interleave their transactions; the
    retries in ensure() cover programs that do not take it)."""

    def __enter__(self):
        try:
            self.fd = os.open(_lock_path(), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            self.fd = None  # without the lock: the transaction is still atomic, a conflict is retried
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock


# --- the public calls -------------------------------------------------------------------------

def ensure(policy: Policy | None = None) -> Status:
    """Make the rules of `policy` (default: the settings') be in place; cheap when they
    are. Never raises: a Status that is not enforced says why and what to do."""
    policy = policy or Policy.from_settings()
    try:
        with _Locked():
            resolvers = local_resolvers(policy.resolv_conf)
            changed = False
            for version in _families():
                for attempt in range(3):  # another program may change the table between read and write
                    table = read_table(version)
                    if attempt == 0 and _remove_stale(version, table, keep=policy.manager_id):
                        table = read_table(version)
                    lines = _plan(policy, version, table, resolvers)
                    if not lines:
                        break
                    try:
                        _restore(version, lines)
                        changed = True
                    except NetguardError:
                        if attempt == 2:
                            raise
        found = _in_place(policy, changed)
    except NetguardError as exc:
        found = Status(False, f"not enforced: {exc}")
    except OSError as exc:
        found = Status(False, f"not enforced: {os.strerror(exc.errno or errno.EIO)} ({exc})")
    _seen[policy] = (time.monotonic(), found)
    return found


_seen: dict[Policy, tuple[float, Status]] = {}  # policy -> (when, status): status(max_age=) answers from here


def status(policy: Policy | None = None, *, max_age: float = 0) -> Status:
    """Whether the rules of `policy` are in place now (reads only). `max_age`: a status
    read at most that many seconds ago in this process will do (instance pages: no
    iptables-save per page view; `ensure()` and `remove()` refresh it)."""
    policy = policy or Policy.from_settings()
    seen = _seen.get(policy)
    if max_age and seen is not None and time.monotonic() - seen[0] <= max_age:
        return seen[1]
    try:
        found = _in_place(policy, False)
    except NetguardError as exc:
        found = Status(False, f"not enforced: {exc}")
    _seen[policy] = (time.monotonic(), found)
    return found


def _in_place(policy: Policy, changed: bool) -> Status:
    resolvers = local_resolvers(policy.resolv_conf)
    for version in _families():
        if _plan(policy, version, read_table(version), resolvers):
            return Status(False, f"not enforced: the IPv{version} rules of this manager are not in place "
                                 "(they are restored within a minute, or run `python manage.py firewall`)", changed)
    egress = ("other networks are open to the apps (LAB_EGRESS=open)" if policy.egress == "open"
              else "the apps reach nothing outside (LAB_EGRESS=deny); builds reach the outside for pip")
    return Status(True, "firewall rules in place: instances and builds reach no service of this machine, no other "
                        f"instance and no link-local/metadata address; {egress}", changed)


def remove(policy: Policy | str | None = None) -> bool:
    """Take one manager's chains and jumps away (default: this manager's); True when
    something was removed."""
    manager_id = policy if isinstance(policy, str) else (policy or Policy.from_settings()).manager_id
    _seen.clear()
    removed = False
    with _Locked():
        for version in (4, 6):
            try:
                table = read_table(version)
            except NetguardError:
                if version == 6:
                    continue
                raise
            lines = _removal(version, table, {manager_id})
            if lines:
                _restore(version, lines)
                removed = True
    return removed


def remove_stale() -> None:
    """Take away the chains of every manager whose data dir no longer exists (what
    `ensure()` does first; for test runs that end without another ensure)."""
    with _Locked():
        for version in _families():
            _remove_stale(version, read_table(version), keep="")


def _removal(version: int, table: Table, manager_ids: set[str]) -> list[str]:
    doomed = [name for name in table.chains if (m := CHAIN.fullmatch(name)) and m.group(1) in manager_ids]
    if not doomed:
        return []
    lines = [f"-D {parent} {rule}" for parent, rules in table.chains.items() for rule in rules
             if _jump_target(rule) in doomed]
    lines += [f"-F {name}" for name in doomed] + [f"-X {name}" for name in doomed]
    return lines


def _remove_stale(version: int, table: Table, *, keep: str) -> bool:
    """Chains of managers whose data dir (named in their jumps' comment) no longer exists;
    True when some were removed.

    A data dir is only judged where it can be seen: a manager in the manager image (the
    compose install, on the host's network) records its data dir as `container:<path>`
    (a path in its own volume, which no other manager may judge), and judges no one else's
    (the host's paths are not in its file system). Such chains go with `manage.py firewall
    --remove`, run in the compose project before `down -v`."""
    if in_manager_image():
        return False
    stale = set()
    for rules in table.chains.values():
        for rule in rules:
            m = CHAIN.fullmatch(_jump_target(rule))
            if not m or m.group(1) == keep:
                continue
            data_dir = _comment_data_dir(rule)
            if data_dir and data_dir != "-" and os.path.isabs(data_dir) and not os.path.exists(data_dir):
                stale.add(m.group(1))
    if stale:
        _restore(version, _removal(version, table, stale))
    return bool(stale)


def _comment_data_dir(rule: str) -> str:
    try:
        words = shlex.split(rule)
    except ValueError:
        return ""
    for i, word in enumerate(words[:-1]):
        if word == "--comment":
            parts = words[i + 1].split(" ", 2)
            if len(parts) == 3 and parts[0] == COMMENT:
                return parts[2]
    return ""


def show(policy: Policy | None = None) -> str:
    """The rules of `policy` as iptables-restore lines, for `manage.py firewall --show`."""
    policy = policy or Policy.from_settings()
    resolvers = local_resolvers(policy.resolv_conf)
    out = []
    for version in (4, 6):
        out.append(f"# IPv{version}" + ("" if version == 4 or ipv6_enabled() else " (not applied: no IPv6 here)"))
        for parent, rule in desired_jumps(policy, version, docker_user=True).items():
            out.append(f"-I {parent} 1 {rule}")
        for name, rules in desired_chains(policy, version, resolvers[version]).items():
            out += [f"-A {name} {rule}" for rule in rules]
    return "\n".join(out) + "\n"
