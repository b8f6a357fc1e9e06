"""Ansible through the tunnel vs direct SSH, and inventory time for 10,000 devices.

1. A 10-task playbook on 10 devices (forks 10, pipelining, ControlPersist as in ansible.cfg).
   fleet-tunnel: the fleet inventory (listing and sessions through the per-user helper: the
   ProxyCommand is the stdlib-only ``tunnel/helper_client.py``; per-session certificates through
   ``Match exec``, renewed by the helper alongside each dial). Each tunnel run starts with no
   helper and no cached certificate (both counted). Baseline: the same playbook over direct SSH to the same
   sshds on 127.0.0.1 with the same certificates and host CA (fetched before each direct run,
   untimed). Each run starts with no ssh master (its own ControlPath directory). Runs alternate
   in ABBA order (2 of each with --quick, 3 without). Reported: median wall time of each, and
   the ratio. Each device's sshd listens on a free port (other benches and tests share the
   machine); a failed run names the hosts and the reason.
2. Inventory for 10,000 devices: a registry with 10,000 device rows (bulk insert), the proxy
   running; ``ansible-inventory --list`` through the proxy, and the plugin building the
   inventory from the device list (InventoryManager in-process, listing already fetched).

Runs on loopback (no namespaces, no NAT) so both paths reach the very same sshds.
"""

from __future__ import annotations

import getpass
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import case_main, paths  # noqa: E402

paths()

from fleet_harness import Fleet  # noqa: E402
from test_ansible import ansible_cmd, ansible_env  # noqa: E402

PLAYBOOK = """\
- name: Ten tasks
  hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.ping:
    - ansible.builtin.command: uptime
      changed_when: false
    - ansible.builtin.command: id -un
      changed_when: false
    - ansible.builtin.shell: echo "$((6 * 7))"
      changed_when: false
    - ansible.builtin.copy:
        content: "bench {{ inventory_hostname }}\\n"
        dest: "/tmp/ft-bench-{{ inventory_hostname }}"
        mode: "0644"
    - ansible.builtin.stat:
        path: "/tmp/ft-bench-{{ inventory_hostname }}"
    - ansible.builtin.slurp:
        src: "/tmp/ft-bench-{{ inventory_hostname }}"
    - ansible.builtin.lineinfile:
        path: "/tmp/ft-bench-{{ inventory_hostname }}"
        line: "second line"
    - ansible.builtin.command: cat /tmp/ft-bench-{{ inventory_hostname }}
      changed_when: false
    - ansible.builtin.file:
        path: "/tmp/ft-bench-{{ inventory_hostname }}"
        state: absent
"""


class PlaybookLab:
    """Ten devices (an sshd and an agent each) behind one proxy, and the two ways to run the
    playbook on them: the fleet inventory through the tunnel, and a static inventory reaching the
    same sshds directly. Also used by ad-hoc profiling (``PlaybookLab(...).run("tunnel")``)."""

    def __init__(self, devices: int = 10):
        from fleet_harness import free_udp_port

        self.work = work = Path(tempfile.mkdtemp(prefix="ft-bench-ansible-"))
        work.chmod(0o755)
        login = getpass.getuser()
        self.fleet = fleet = Fleet(work)
        self.runtime = str(work / "run")  # the helper's socket (XDG_RUNTIME_DIR); Fleet.close stops it
        os.mkdir(self.runtime, 0o700)
        fleet.env["XDG_RUNTIME_DIR"] = self.runtime
        self.sshds: list = []
        self.agents: list = []
        fleet.start_proxy()
        ports = {}
        for i in range(devices):
            name = f"dev-{i:02d}"
            port = free_udp_port()  # not fixed ports: other benches and tests share the machine
            config = fleet.enroll_device(name, {"customer": "acme"}, {"ssh": f"127.0.0.1:{port}"})
            d = config.parent
            principals = d / "principals"
            principals.mkdir(mode=0o755)
            (principals / login).write_text(f"{login}@{name}\n")
            from lab import plan

            cfg = d / "sshd_config"
            cfg.write_text(plan.sshd_config(
                port=port, host_keys=[d / "ssh_host_ed25519_key"], pid_file=str(d / "sshd.pid"),
                authorized_keys="none",
                extra=(f"TrustedUserCAKeys {d}/user_ca.pub\nAuthorizedPrincipalsFile {principals}/%u\n"
                       f"HostCertificate {d}/ssh_host_ed25519_key-cert.pub\nMaxStartups 100\n")))
            self.sshds.append(fleet.start(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], d / "sshd.log"))
            self.agents.append(fleet.start_agent(config))
            ports[name] = port
        self.ops = ops = fleet.user("ops", ["admin"])
        for name in ports:
            fleet.wait_online(ops, name, timeout=30)
        self.tunnel_inv = work / "bench.fleet.yml"
        self.tunnel_inv.write_text(f"plugin: fleet.tunnel.fleet\nidentity: {ops}\nlogin: {login}\n")
        # direct: same sshds, same certificate and host CA, no tunnel
        self.login, self.ports = login, ports
        hosts = {}
        for name, port in ports.items():
            cert = self._direct_cert(name)
            hosts[name] = {
                "ansible_host": "127.0.0.1", "ansible_port": port, "ansible_user": login,
                "ansible_ssh_common_args": (f"-F /dev/null -o IdentityFile={ops}/ssh/id_ed25519 -o CertificateFile={cert} "
                                            f"-o IdentitiesOnly=yes -o UserKnownHostsFile={ops}/known_hosts "
                                            f"-o HostKeyAlias={name} -o StrictHostKeyChecking=yes"),
            }
        # JSON is YAML: the yaml plugin reads it
        self.direct_inv = work / "direct.yml"
        self.direct_inv.write_text(json.dumps({"all": {"hosts": hosts}}))
        self.book = work / "ten-tasks.yml"
        self.book.write_text(PLAYBOOK)
        self.runs = 0

    def _direct_cert(self, name: str) -> str:
        """A fresh certificate for the direct runs (five minutes' life; a tunnel run's cold start
        deletes it): fetched before each direct run, outside its timing, as an engineer who
        logs in to a device directly would hold one already."""
        return subprocess.run([sys.executable, "-m", "tunnel.cli", "ssh-cert", name, self.login, "--print-path",
                               "--identity", str(self.ops)], capture_output=True, text=True, check=True,
                              env={**os.environ, **self.fleet.env, "FLEET_HELPER": "off"}).stdout.strip()

    def run(self, tag: str, extra_env: dict | None = None, cold: bool = True) -> float:
        """One playbook run, ``tag`` "tunnel" (cold: no helper, no certificate) or "direct" (or a
        warm-up); each with its own ControlPath directory, so no ssh master from an earlier run
        is reused. Returns the wall time."""
        self.runs += 1
        cp = Path(tempfile.mkdtemp(prefix=f"cp{self.runs}", dir="/tmp"))
        # the direct inventory is a YAML file: enable that parser for it (ansible.cfg has not)
        env = ansible_env(ANSIBLE_FORKS=10, ANSIBLE_SSH_CONTROL_PATH_DIR=cp,
                          ANSIBLE_INVENTORY_ENABLED="host_list,auto,yaml", XDG_RUNTIME_DIR=self.runtime,
                          PYTHONPATH=str(Path(__file__).resolve().parents[2]), **(extra_env or {}))
        inv = self.tunnel_inv if tag == "tunnel" else self.direct_inv
        if tag != "tunnel":
            for name in self.ports:
                self._direct_cert(name)
        elif cold:  # no helper, no certificate from an earlier run
            subprocess.run([sys.executable, "-m", "tunnel.cli", "helper", "stop", "--identity", str(self.ops)],
                           env=env, capture_output=True, timeout=30)
            for cert in (self.ops / "ssh").glob("*-cert.pub"):
                cert.unlink()
        t0 = time.perf_counter()
        out = subprocess.run(ansible_cmd("ansible-playbook", "-i", inv, self.book), capture_output=True,
                             text=True, env=env, cwd=self.work, timeout=600)
        elapsed = time.perf_counter() - t0
        for sock in cp.iterdir():  # stop this run's ssh masters (by their control socket)
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True)
        subprocess.run(["rm", "-rf", str(cp)])
        if out.returncode != 0:
            why = [ln for ln in out.stdout.splitlines() if "UNREACHABLE" in ln or "FAILED" in ln]
            raise RuntimeError(f"{tag} playbook failed:\n" + "\n".join(why[:10]) +
                               f"\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return elapsed

    def close(self) -> None:
        self.fleet.close()
        subprocess.run(["rm", "-rf", str(self.work)])


def _playbook_rows(quick: bool) -> list[dict]:
    lab = PlaybookLab()
    try:
        # Alternating, in ABBA order: the machine is shared, and its load drifts over the minutes a
        # run takes; a single pair (median of 1) read that drift as the tunnel's cost.
        order = ["direct", "tunnel", "tunnel", "direct"] + ([] if quick else ["direct", "tunnel"])
        reps = len(order) // 2
        times: dict[str, list[float]] = {"direct": [], "tunnel": []}
        lab.run("warm-up")
        for tag in order:
            times[tag].append(lab.run(tag))
        tunnel_times, direct_times = times["tunnel"], times["direct"]
        t, d = statistics.median(tunnel_times), statistics.median(direct_times)
        return [
            {"metric": "10-task playbook x 10 devices, through the tunnel", "value": round(t, 2), "unit": "s",
             "baseline": round(d, 2), "baseline_name": "direct SSH", "note": f"median of {reps}; "
             f"tunnel {[round(x, 1) for x in tunnel_times]}, direct {[round(x, 1) for x in direct_times]}"},
            {"metric": "playbook time ratio tunnel / direct SSH", "value": round(t / d, 3), "unit": "ratio",
             "target": "≤ 1.15"},
        ]
    finally:
        lab.close()


def _inventory_rows(quick: bool) -> list[dict]:
    n = 10_000
    work = Path(tempfile.mkdtemp(prefix="ft-bench-inv-"))
    fleet = Fleet(work)
    rows = []
    try:
        now = "2026-01-01T00:00:00.000000Z"
        devices = [{"id": f"dev-{i:05d}", "labels": json.dumps({"customer": ("acme", "globex")[i % 2],
                                                                "site": f"s{i % 50}", "firmware": f"1.{i % 7}.0",
                                                                "lifecycle": "active"}),
                    "cert_serial": f"{i:032x}", "ssh_host_key": "", "enrolled_at": now, "last_seen": now}
                   for i in range(n)]
        with fleet.state.registry() as reg, reg.write() as db:
            db["devices"].insert_all(devices, batch_size=1000)
        fleet.start_proxy()
        ops = fleet.user("ops", ["admin"])
        inv = work / "big.fleet.yml"
        inv.write_text(f"plugin: fleet.tunnel.fleet\nidentity: {ops}\ntimeout: 15\n")
        t0 = time.perf_counter()
        out = subprocess.run(ansible_cmd("ansible-inventory", "-i", inv, "--list"), capture_output=True, text=True,
                             env=ansible_env(), cwd=work, timeout=300)
        live = time.perf_counter() - t0
        if out.returncode == 0 and len(json.loads(out.stdout)["_meta"]["hostvars"]) == n:
            rows.append({"metric": f"ansible-inventory --list, {n} devices through the proxy", "value": round(live, 2),
                         "unit": "s", "target": "< 10 s"})
        else:
            reason = next((ln.strip() for ln in out.stderr.splitlines() if "fleet inventory" in ln),
                          out.stderr.strip()[-200:])
            rows.append({"metric": f"ansible-inventory --list, {n} devices through the proxy", "value": None,
                         "unit": "s", "target": "< 10 s",
                         "note": f"failed after {live:.1f}s: {reason} (the proxy's ls reply must fit one 4 KB "
                                 "stream header: about 20 devices)"})
        # the plugin's own cost: the same 10,000-device listing, already fetched
        listing = [{"id": d["id"], "labels": json.loads(d["labels"]), "lifecycle": "active", "online": False,
                    "last_seen": now, "address": None, "locked": False} for d in devices]
        code = f"""
import json, sys, time
from ansible.parsing.dataloader import DataLoader
from ansible.inventory.manager import InventoryManager
from ansible.plugins.loader import init_plugin_loader, inventory_loader
init_plugin_loader()
listing = json.load(open(sys.argv[1]))
plugin = inventory_loader.get("fleet.tunnel.fleet")
sys.modules[type(plugin).__module__].fetch_devices = lambda *a, **k: listing
t0 = time.perf_counter()
inv = InventoryManager(loader=DataLoader(), sources=[sys.argv[2]])
elapsed = time.perf_counter() - t0
assert len(inv.hosts) == {n}, len(inv.hosts)
print(elapsed, len(inv.groups))
"""
        (work / "listing.json").write_text(json.dumps(listing))
        out = subprocess.run([sys.executable, "-c", code, str(work / "listing.json"), str(inv)], capture_output=True,
                             text=True, env=ansible_env(), cwd=work, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        elapsed, groups = out.stdout.split()
        rows.append({"metric": f"inventory built from a {n}-device listing (plugin + Ansible)",
                     "value": round(float(elapsed), 2), "unit": "s", "target": "< 5 s",
                     "note": f"{groups} groups; listing already fetched"})
        return rows
    finally:
        fleet.close()
        subprocess.run(["rm", "-rf", str(work)])


def run(quick: bool = False) -> list[dict]:
    os.environ.setdefault("ANSIBLE_CONFIG", str(Path(__file__).resolve().parents[2] / "ansible.cfg"))
    return _playbook_rows(quick) + _inventory_rows(quick)


if __name__ == "__main__":
    case_main("ansible", run)
