"""Ansible through the tunnel in the network lab: real ansible-core, real OpenSSH, devices behind CGNAT.

The proxy sits in the internet namespace; each device runs the agent and its own sshd that trusts
only the fleet user CA. ansible-playbook runs in the internet namespace (where engineers sit)
with the fleet inventory: every task goes ProxyCommand -> proxy -> agent -> the device's sshd.
A fresh device is then provisioned by the roles themselves (enroll.yml, agent.yml) and a proxy
host by proxy.yml; second runs change nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fleet_harness import Fleet, wait_until
from lab import netns
from test_ansible import REPO, ansible_cmd, ansible_env, graph_groups, inventory_file, recap

from enroll import tokens

pytestmark = pytest.mark.lab

DEVICES = {"acme-1": "acme", "acme-2": "acme", "globex-1": "globex"}
SYSTEM_PYTHON = "/usr/bin/python3"


def shared_dir(prefix: str) -> Path:
    """A world-traversable temp dir (pytest's tree is root-only; the agent runs unprivileged)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def wheelhouse() -> Path:
    """fleet-tunnel and its dependencies as wheels, for installing inside namespaces (no internet).

    Dependencies are cached per pyproject.toml; the fleet-tunnel wheel is rebuilt from this tree.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fleet-tunnel" / "wheelhouse"
    cache.mkdir(parents=True, exist_ok=True)
    # pip resolves the current requirements every time and only fetches wheels not yet cached
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", f"{REPO}[server]", "-w", str(cache)],
                   check=True, capture_output=True, timeout=600)
    house = shared_dir("ft-wheelhouse-")
    for wheel in cache.glob("*.whl"):
        if not wheel.name.startswith("fleet_tunnel-"):
            shutil.copy(wheel, house)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(house)],
                   check=True, capture_output=True, timeout=300)
    for p in house.iterdir():
        p.chmod(0o644)
    return house


class World:
    def __init__(self, lab, root: Path):
        self.lab = lab
        self.root = root
        self.fleet = Fleet(root, proxy_host=lab.proxy_public, proxy_port=443, extra_ips=(lab.proxy_ground,))
        self.fleet.start_proxy(spawn=lambda argv, **kw: lab.spawn(lab.internet, argv, **kw), listen="0.0.0.0:443")
        self.devices = {}
        self.cleanup: list[Path] = []
        for name, customer in DEVICES.items():
            self.add_device(name, customer)
        self.ops = self.fleet.user("ops", ["admin"])
        for name in self.devices:
            self.fleet.wait_online(self.ops, name, run=self.run, timeout=30)

    def add_device(self, name: str, customer: str) -> None:
        dev = self.lab.add_device(name.replace("-", ""), uplinks=("cellular",))
        config = self.fleet.enroll_device(name, {"customer": customer, "site": "dal"}, {"ssh": "127.0.0.1:22"},
                                          keepalive="5s")
        d = config.parent
        principals = shared_dir(f"ft-principals-{name}-")
        self.cleanup.append(principals)
        (principals / "root").write_text(f"root@{name}\n")
        (principals / "root").chmod(0o644)
        dev.start_sshd(config_extra=(f"AuthorizedKeysFile none\nTrustedUserCAKeys {d}/user_ca.pub\n"
                                     f"AuthorizedPrincipalsFile {principals}/%u\n"
                                     f"HostCertificate {d}/ssh_host_ed25519_key-cert.pub\n"),
                       host_key_dir=d)
        self.fleet.start_agent(config, spawn=lambda argv, **kw: dev.spawn(argv, **kw))
        self.devices[name] = dev

    def run(self, argv, **kw):
        return subprocess.run(netns.ns_argv(self.lab.internet, argv), **kw)

    def ansible(self, tool: str, *args, timeout: float = 180, **env) -> subprocess.CompletedProcess:
        """An ansible command in the internet namespace, as an engineer runs it."""
        return self.run(ansible_cmd(tool, *args), capture_output=True, text=True, timeout=timeout,
                        env=ansible_env(**env), cwd=self.root)


@pytest.fixture(scope="module")
def world(module_lab, tmp_path_factory):
    w = World(module_lab, tmp_path_factory.mktemp("ansible-lab"))
    yield w
    w.fleet.close()
    for path in w.cleanup:
        shutil.rmtree(path, ignore_errors=True)


def test_graph_shows_label_groups(world):
    out = world.ansible("ansible-inventory", "-i", inventory_file(world.root, world.ops), "--graph")
    assert out.returncode == 0, out.stderr
    groups = graph_groups(out.stdout)
    assert groups["label_customer_acme"] == {"acme-1", "acme-2"}
    assert groups["label_customer_globex"] == {"globex-1"}
    assert groups["label_site_dal"] == set(DEVICES)
    assert groups["fleet_online"] == set(DEVICES)


def test_collect_logs_through_the_tunnel_touches_only_acme(world, tmp_path):
    inv = inventory_file(world.root, world.ops)
    dest = tmp_path / "logs"
    extra = {"collect_logs_dest": str(dest),
             "collect_logs_paths": [f"{world.fleet.root}/devices/{{{{ inventory_hostname }}}}/agent.log"]}
    audit_before = len(world.fleet.audit())
    out = world.ansible("ansible-playbook", "-i", inv, REPO / "playbooks" / "collect-logs.yml",
                        "--limit", "label_customer_acme", "-e", json.dumps(extra))
    assert out.returncode == 0, out.stdout + out.stderr
    assert set(recap(out.stdout)) == {"acme-1", "acme-2"}
    assert sorted(p.name for p in dest.iterdir()) == ["acme-1", "acme-2"]
    for name in ("acme-1", "acme-2"):
        got = dest / name
        # the device's own agent log, fetched over scp/sftp through the tunnel
        assert (got / "agent.log").read_bytes() == (world.fleet.root / "devices" / name / "agent.log").read_bytes()[
            : len((got / "agent.log").read_bytes())]
        # `ip address` ran inside that device's namespace: its private CGNAT-side address
        assert world.devices[name].address("cellular") in (got / "ip-addr.txt").read_text()
    # every session went through the proxy, as root on acme devices only
    sessions = [e for e in world.fleet.audit()[audit_before:] if e["type"] == "session.start"]
    assert sessions and {e["device"] for e in sessions} == {"acme-1", "acme-2"}


def test_ad_hoc_ping_and_firmware_report(world, tmp_path):
    inv = inventory_file(world.root, world.ops)
    out = world.ansible("ansible", "-i", inv, "fleet", "-m", "ansible.builtin.ping", "-o")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(DEVICES)
    version = world.fleet.root / "firmware-version"
    version.write_text("1.2.0\n")
    report = tmp_path / "firmware.csv"
    extra = {"firmware_report_command": ["cat", str(version)], "firmware_report_dest": str(report)}
    out = world.ansible("ansible-playbook", "-i", inv, REPO / "playbooks" / "firmware-report.yml",
                        "-e", json.dumps(extra))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = report.read_text().splitlines()
    assert rows[0] == "device,firmware_label,running,status"
    # no firmware label on these devices: running 1.2.0 against label '-' is a mismatch
    assert sorted(r.split(",")[0] for r in rows[1:]) == sorted(DEVICES)
    assert all(r.endswith(",-,1.2.0,MISMATCH") for r in rows[1:])


# --- the roles converge on a lab device, and a second run changes nothing -------------------------


@pytest.fixture(scope="module")
def wheels():
    house = wheelhouse()
    yield house
    shutil.rmtree(house, ignore_errors=True)


def _local_playbook(ns: str, playbook: str, extra: dict, cwd: Path, env=None,
                    check: bool = False) -> subprocess.CompletedProcess:
    argv = ansible_cmd("ansible-playbook", "-i", "localhost,", "-c", "local",
                       REPO / "playbooks" / playbook, "-e", json.dumps(extra), *(["--check"] if check else []))
    env = {**ansible_env(), **(env or {})}
    env.pop("PYTHONPATH", None)  # else pip in the device's venv takes this checkout as installed
    return subprocess.run(netns.ns_argv(ns, argv), capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_roles_enroll_and_agent_converge_on_a_fresh_device(world, wheels):
    root = shared_dir("ft-ansible-device-")
    world.cleanup.append(root)
    dev = world.lab.add_device("acme3", uplinks=("wifi",))
    with world.fleet.state.registry() as reg:
        token, _ = tokens.create(reg, world.fleet.state.fleet, labels={"customer": "acme", "site": "hou"})
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    common = {
        "ansible_python_interpreter": SYSTEM_PYTHON,
        "fleet_hosts": "localhost",
        "tunnel_agent_venv": f"{root}/venv",
        "tunnel_agent_python": SYSTEM_PYTHON,  # not a pyenv shim under root's 0700 home
        "tunnel_agent_pip_extra_args": f"--no-index --find-links {wheels}",
        "tunnel_agent_dir": f"{root}/etc",
    }
    enroll_vars = {**common, "fleet_enroll_dir": f"{root}/etc", "fleet_enroll_proxy": f"{world.lab.proxy_public}:443",
                   "fleet_enroll_ca_pin": world.fleet.pin,  # the token: $FLEET_TOKEN, on no command line
                   "fleet_enroll_name": "acme-3", "fleet_enroll_server_name": "proxy.test"}
    # the device's own host key, which sshd must keep offering next to the fleet key
    distro_key = root / "distro" / "ssh_host_ed25519_key"
    distro_key.parent.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(distro_key)], check=True)
    agent_vars = {**common, "tunnel_agent_service_manager": "process",
                  "tunnel_agent_unit_dir": f"{root}/systemd", "tunnel_agent_run_dir": f"{root}/run",
                  "tunnel_agent_log_file": f"{root}/agent.log", "tunnel_agent_sshd_dir": f"{root}/sshd",
                  "tunnel_agent_sshd_config": f"{root}/sshd_config.d/fleet-tunnel.conf",
                  "tunnel_agent_principals_dir": f"{root}/principals",
                  "tunnel_agent_sshd_pid_file": f"{root}/sshd.pid",
                  "tunnel_agent_logrotate_dir": f"{root}/logrotate.d",
                  "tunnel_agent_sshd_main_config": "",  # the lab's sshd runs from its own config
                  "tunnel_agent_sshd_default_host_keys": [str(distro_key), f"{root}/distro/missing_key"],
                  # the lab has no DNS for proxy.test: dial the proxy's address (what the role's
                  # settings merge is for)
                  "tunnel_agent_settings": {"keepalive": "5s", "proxies": [
                      {"address": f"{world.lab.proxy_public}:443", "server_name": "proxy.test"}]}}
    try:
        out = _local_playbook(dev.ns, "enroll.yml", enroll_vars, root, env={"FLEET_TOKEN": token})
        assert out.returncode == 0, out.stdout + out.stderr
        assert token not in out.stdout + out.stderr  # no_log: the token never shows
        out = _local_playbook(dev.ns, "agent.yml", agent_vars, root)
        assert out.returncode == 0, out.stdout + out.stderr
        assert recap(out.stdout)["localhost"]["changed"] > 0

        # what the role made: modes, the hardened unit, sshd trust
        etc = root / "etc"
        assert (etc.stat().st_mode & 0o777) == 0o700
        assert (etc / "device.key").stat().st_mode & 0o777 == 0o600
        assert (root / "sshd" / "ssh_host_ed25519_key").stat().st_uid == 0
        unit = (root / "systemd" / "fleet-tunnel-agent.service").read_text()
        assert "Restart=on-failure" in unit and "NoNewPrivileges=yes" in unit and "User=fleet-tunnel" in unit
        assert (root / "principals" / "root").read_text() == "root@acme-3\n"
        dropin = (root / "sshd_config.d" / "fleet-tunnel.conf").read_text()
        assert f"TrustedUserCAKeys {root}/sshd/user_ca.pub" in dropin
        # the device's own key first (sshd serves the first key of a type), missing ones skipped
        assert dropin.index(f"HostKey {distro_key}\n") < dropin.index(f"HostKey {root}/sshd/ssh_host_ed25519_key\n")
        assert "missing_key" not in dropin

        # the device's sshd runs with the role's drop-in; the agent the role started dials out
        dev.start_sshd(config_extra=f"Include {root}/sshd_config.d/fleet-tunnel.conf\nAuthorizedKeysFile none\n",
                       host_key_dir=root / "sshd")
        try:
            world.fleet.wait_online(world.ops, "acme-3", run=world.run, timeout=30)
        except AssertionError:
            log = root / "agent.log"
            pid = (root / "run" / "fleet-tunnel-agent.pid").read_text().strip()
            probe = subprocess.run(netns.ns_argv(dev.ns, ["timeout", "5", "runuser", "-u", "fleet-tunnel", "--",
                                                          f"{root}/venv/bin/tunnel", "agent", "--config",
                                                          f"{root}/etc/agent.yaml"]), capture_output=True, text=True)
            raise AssertionError(f"acme-3 not online; agent log: {log.read_text() if log.exists() else 'none'}; "
                                 f"pid {pid} alive: {Path(f'/proc/{pid}').exists()}; "
                                 f"foreground: {probe.stderr[-2000:]}") from None
        # a LAN user still sees the device's own host key, not the fleet key
        scan = subprocess.run(netns.ns_argv(dev.ns, ["ssh-keyscan", "-t", "ed25519", "127.0.0.1"]),
                              capture_output=True, text=True, timeout=30)
        distro_blob = Path(f"{distro_key}.pub").read_text().split()[1]
        assert distro_blob in scan.stdout, scan.stdout + scan.stderr
        inv = inventory_file(world.root, world.ops)
        out = world.ansible("ansible", "-i", inv, "acme-3", "-m", "ansible.builtin.command",
                            "-a", "id -un", "-o")
        assert out.returncode == 0 and "root" in out.stdout, out.stdout + out.stderr

        # second runs: nothing to change
        for playbook, extra in (("enroll.yml", enroll_vars), ("agent.yml", agent_vars)):
            out = _local_playbook(dev.ns, playbook, extra, root)
            assert out.returncode == 0, out.stdout + out.stderr
            assert recap(out.stdout)["localhost"]["changed"] == 0, (playbook, out.stdout)
    finally:
        subprocess.run(["start-stop-daemon", "--stop", "--pidfile", f"{root}/run/fleet-tunnel-agent.pid",
                        "--retry", "TERM/5/KILL/2", "--oknodo", "--remove-pidfile"], capture_output=True)


def test_proxy_role_converges(world, wheels):
    root = shared_dir("ft-ansible-proxy-")
    world.cleanup.append(root)
    host = world.lab.add_device("proxyhost", uplinks=("wifi",))
    # what CAP_NET_BIND_SERVICE gives the systemd unit: the unprivileged proxy may bind UDP 443
    world.lab.run(host.ns, ["sysctl", "-q", "-w", "net.ipv4.ip_unprivileged_port_start=0"])
    extra = {"ansible_python_interpreter": SYSTEM_PYTHON, "fleet_hosts": "localhost",
             "tunnel_proxy_venv": f"{root}/venv", "tunnel_proxy_python": SYSTEM_PYTHON, "tunnel_proxy_pip_extra_args": f"--no-index --find-links {wheels}",
             "tunnel_proxy_state_dir": f"{root}/state", "tunnel_proxy_fleet": "lab-fleet",
             "tunnel_proxy_name": "proxy.lab", "tunnel_proxy_ips": [host.address("wifi")],
             "tunnel_proxy_service_manager": "process", "tunnel_proxy_unit_dir": f"{root}/systemd",
             "tunnel_proxy_run_dir": f"{root}/run", "tunnel_proxy_log_file": f"{root}/proxy.log",
             "tunnel_proxy_logrotate_dir": f"{root}/logrotate.d"}
    try:
        out = _local_playbook(host.ns, "proxy.yml", extra, root)
        assert out.returncode == 0, out.stdout + out.stderr
        assert (root / "state").stat().st_mode & 0o777 == 0o700
        assert (root / "state" / "ca.key").stat().st_mode & 0o777 == 0o600
        unit = (root / "systemd" / "fleet-tunnel-proxy.service").read_text()
        assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in unit and "--listen 0.0.0.0:443" in unit

        def udp_443_pid():
            """The proxy's pid once it has bound UDP 443 in the proxy host's namespace."""
            try:
                pid = (root / "run" / "fleet-tunnel-proxy.pid").read_text().strip()
                sockets = Path(f"/proc/{pid}/net/udp").read_text() + Path(f"/proc/{pid}/net/udp6").read_text()
            except OSError:
                return None
            return pid if ":01BB " in sockets else None

        pid = wait_until(udp_443_pid, 20, 0.2, "proxy bound to UDP 443")
        assert Path(f"/proc/{pid}").stat().st_uid != 0  # by the unprivileged account
        out = _local_playbook(host.ns, "proxy.yml", extra, root)
        assert out.returncode == 0, out.stdout + out.stderr
        assert recap(out.stdout)["localhost"]["changed"] == 0, out.stdout
    finally:
        subprocess.run(["start-stop-daemon", "--stop", "--pidfile", f"{root}/run/fleet-tunnel-proxy.pid",
                        "--retry", "TERM/5/KILL/2", "--oknodo", "--remove-pidfile"], capture_output=True)



def _bumped_wheel(dest: Path) -> str:
    """A fleet-tunnel wheel one patch version above this tree's, built from a temp copy."""
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    parts = version.split(".")
    newer = ".".join([*parts[:-1], str(int(parts[-1]) + 1)])
    with tempfile.TemporaryDirectory(prefix="ft-bump-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.egg-info", "build", ".venv", ".ruff_cache", ".pytest_cache"))
        pyproject = src / "pyproject.toml"
        pyproject.write_text(pyproject.read_text().replace(f'version = "{version}"', f'version = "{newer}"', 1))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(dest)],
                       check=True, capture_output=True, timeout=300)
    for p in dest.iterdir():
        p.chmod(0o644)
    return newer


def test_agent_role_recovers_from_a_failed_first_run_then_upgrades(world, wheels):
    """Done-check of issue 18: the first run fails after writing the sshd drop-in and before the
    reload (the case a lost handler would never make good); the re-run reloads sshd, starts the
    agent and waits for it to connect, and ssh through the tunnel works. Then the role upgrades
    the agent to a newer wheel, restarts it, and the new version is what runs."""
    root = shared_dir("ft-ansible-redo-")
    world.cleanup.append(root)
    dev = world.lab.add_device("acme4", uplinks=("wifi",))
    with world.fleet.state.registry() as reg:
        token, _ = tokens.create(reg, world.fleet.state.fleet, labels={"customer": "acme", "site": "hou"})
    # the device's sshd, running before the role: its config includes the drop-in directory
    # (empty yet), so only a reload makes it trust the fleet user CA
    sshd = dev.start_sshd(config_extra=f"Include {root}/sshd_config.d/*.conf\nAuthorizedKeysFile none\n")
    common = {"ansible_python_interpreter": SYSTEM_PYTHON, "fleet_hosts": "localhost",
              "tunnel_agent_venv": f"{root}/venv", "tunnel_agent_python": SYSTEM_PYTHON,
              "tunnel_agent_pip_extra_args": f"--no-index --find-links {wheels}",
              "tunnel_agent_dir": f"{root}/etc"}
    enroll_vars = {**common, "fleet_enroll_dir": f"{root}/etc", "fleet_enroll_proxy": f"{world.lab.proxy_public}:443",
                   "fleet_enroll_ca_pin": world.fleet.pin, "fleet_enroll_name": "acme-4",
                   "fleet_enroll_server_name": "proxy.test"}
    agent_vars = {**common, "tunnel_agent_service_manager": "process",
                  "tunnel_agent_unit_dir": f"{root}/systemd", "tunnel_agent_run_dir": f"{root}/run",
                  "tunnel_agent_log_file": f"{root}/agent.log", "tunnel_agent_sshd_dir": f"{root}/sshd",
                  "tunnel_agent_sshd_config": f"{root}/sshd_config.d/fleet-tunnel.conf",
                  "tunnel_agent_principals_dir": f"{root}/principals",
                  "tunnel_agent_sshd_pid_file": str(sshd.pid_file),
                  "tunnel_agent_sshd_main_config": str(sshd.config_path),
                  "tunnel_agent_sshd_default_host_keys": [str(k) for k in sshd.host_keys],
                  "tunnel_agent_logrotate_dir": f"{root}/logrotate.d",
                  "tunnel_agent_settings": {"keepalive": "5s", "proxies": [
                      {"address": f"{world.lab.proxy_public}:443", "server_name": "proxy.test"}]}}
    pid_file = root / "run" / "fleet-tunnel-agent.pid"
    inv = inventory_file(world.root, world.ops)
    try:
        out = _local_playbook(dev.ns, "enroll.yml", enroll_vars, root, env={"FLEET_TOKEN": token})
        assert out.returncode == 0, out.stdout + out.stderr

        # first run: fails midway, after the drop-in is written, before sshd is reloaded
        broken = {**agent_vars, "tunnel_agent_sshd_main_config": f"{root}/no_such_sshd_config"}
        out = _local_playbook(dev.ns, "agent.yml", broken, root)
        assert out.returncode != 0, out.stdout
        assert "Check sshd's whole configuration" in out.stdout, out.stdout
        assert (root / "sshd_config.d" / "fleet-tunnel.conf").exists()
        assert not (root / "sshd" / "reloaded.sha256").exists()

        # re-run: nothing in the drop-in changes, yet sshd is reloaded and the agent connects
        out = _local_playbook(dev.ns, "agent.yml", agent_vars, root)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "changed: [localhost]" in out.stdout.split("Reload sshd (process)")[1].split("TASK")[0], out.stdout
        world.fleet.wait_online(world.ops, "acme-4", run=world.run, timeout=30)
        out = world.ansible("ansible", "-i", inv, "acme-4", "-m", "ansible.builtin.command", "-a", "id -un", "-o")
        assert out.returncode == 0 and "root" in out.stdout, out.stdout + out.stderr + sshd.log_path.read_text()
        old_pid = pid_file.read_text().strip()

        # upgrade through the role: a pinned newer wheel is installed and the agent restarted
        newer_dir = shared_dir("ft-wheel-newer-")
        world.cleanup.append(newer_dir)
        newer = _bumped_wheel(newer_dir)
        upgrade = {**agent_vars, "tunnel_agent_version": newer,
                   "tunnel_agent_pip_extra_args": f"--no-index --find-links {wheels} --find-links {newer_dir}"}
        out = _local_playbook(dev.ns, "agent.yml", upgrade, root)
        assert out.returncode == 0, out.stdout + out.stderr
        assert recap(out.stdout)["localhost"]["changed"] > 0
        new_pid = pid_file.read_text().strip()
        assert new_pid != old_pid, "the agent was not restarted after the upgrade"
        running = subprocess.run(netns.ns_argv(dev.ns, [f"{root}/venv/bin/python", "-I", "-c",
                                                        "import importlib.metadata as m; print(m.version('fleet-tunnel'))"]),
                                 capture_output=True, text=True, timeout=30,
                                 env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert running.stdout.strip() == newer, running.stderr
        assert f"{root}/venv/bin/tunnel".encode() in Path(f"/proc/{new_pid}/cmdline").read_bytes().split(b"\0")
        world.fleet.wait_online(world.ops, "acme-4", run=world.run, timeout=30)
        out = world.ansible("ansible", "-i", inv, "acme-4", "-m", "ansible.builtin.command", "-a", "id -un", "-o")
        assert out.returncode == 0 and "root" in out.stdout, out.stdout + out.stderr

        # and a --check run afterwards reports nothing to change (no false change from pip)
        out = _local_playbook(dev.ns, "agent.yml", upgrade, root, check=True)
        assert out.returncode == 0, out.stdout + out.stderr
        assert recap(out.stdout)["localhost"]["changed"] == 0, out.stdout
    finally:
        subprocess.run(["start-stop-daemon", "--stop", "--pidfile", str(pid_file),
                        "--retry", "TERM/5/KILL/2", "--oknodo", "--remove-pidfile"], capture_output=True)
