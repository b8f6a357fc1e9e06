"""Ansible through the tunnel vs direct SSH, and inventory time for 10,000 devices.

1. A 10-task playbook on 10 devices (forks 10, pipelining, ControlPersist as in ansible.cfg).
   fleet-tunnel: the fleet inventory (listing and sessions through the per-user helper: the
   ProxyCommand is the stdlib-only ``tunnel/helper_client.py``; per-session certificates through
   ``Match exec``, renewed by the helper alongside each dial). Each tunnel run starts with no
   helper and no cached certificate (both counted). Baseline: the same playbook over direct SSH to the same
   sshds on 127.0.0.1 with the same certificates and host CA. Each run starts with no ssh master
   (its own ControlPath directory). Reported: median wall time of each, and the ratio.
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


def _playbook_rows(quick: bool) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="ft-bench-ansible-"))
    work.chmod(0o755)
    login = getpass.getuser()
    fleet = Fleet(work)
    runtime = str(work / "run")  # the helper's socket (XDG_RUNTIME_DIR); Fleet.close stops it
    os.mkdir(runtime, 0o700)
    fleet.env["XDG_RUNTIME_DIR"] = runtime
    try:
        fleet.start_proxy()
        ports = {}
        for i in range(10):
            name = f"dev-{i:02d}"
            port = 22300 + i
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
            fleet.start(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], d / "sshd.log")
            fleet.start_agent(config)
            ports[name] = port
        ops = fleet.user("ops", ["admin"])
        for name in ports:
            fleet.wait_online(ops, name, timeout=30)
        tunnel_inv = work / "bench.fleet.yml"
        tunnel_inv.write_text(f"plugin: fleet.tunnel.fleet\nidentity: {ops}\nlogin: {login}\n")
        # direct: same sshds, same certificate and host CA, no tunnel
        hosts = {}
        for name, port in ports.items():
            cert = subprocess.run([sys.executable, "-m", "tunnel.cli", "ssh-cert", name, login, "--print-path",
                                   "--identity", str(ops)], capture_output=True, text=True, check=True,
                                  env={**os.environ, **fleet.env}).stdout.strip()
            hosts[name] = {
                "ansible_host": "127.0.0.1", "ansible_port": port, "ansible_user": login,
                "ansible_ssh_common_args": (f"-F /dev/null -o IdentityFile={ops}/ssh/id_ed25519 -o CertificateFile={cert} "
                                            f"-o IdentitiesOnly=yes -o UserKnownHostsFile={ops}/known_hosts "
                                            f"-o HostKeyAlias={name} -o StrictHostKeyChecking=yes"),
            }
        direct_inv = work / "direct.json"
        direct_inv.write_text(json.dumps({"all": {"hosts": hosts}}))
        # direct.json is read by the yaml plugin (JSON is YAML)
        direct_inv = direct_inv.rename(work / "direct.yml")
        book = work / "ten-tasks.yml"
        book.write_text(PLAYBOOK)

        def run(inv: Path, tag: str, k: int) -> float:
            cp = Path(tempfile.mkdtemp(prefix=f"cp{k}", dir="/tmp"))
            # the direct inventory is a YAML file: enable that parser for it (ansible.cfg has not)
            env = ansible_env(ANSIBLE_FORKS=10, ANSIBLE_SSH_CONTROL_PATH_DIR=cp,
                              ANSIBLE_INVENTORY_ENABLED="host_list,auto,yaml", XDG_RUNTIME_DIR=runtime,
                              PYTHONPATH=str(Path(__file__).resolve().parents[2]))
            if tag == "tunnel":  # cold: no helper, no certificate from an earlier run
                subprocess.run([sys.executable, "-m", "tunnel.cli", "helper", "stop", "--identity", str(ops)],
                               env=env, capture_output=True, timeout=30)
                for cert in (ops / "ssh").glob("*-cert.pub"):
                    cert.unlink()
            t0 = time.perf_counter()
            out = subprocess.run(ansible_cmd("ansible-playbook", "-i", inv, book), capture_output=True,
                                 text=True, env=env, cwd=work, timeout=600)
            elapsed = time.perf_counter() - t0
            for sock in cp.iterdir():  # stop this run's ssh masters (by their control socket)
                subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True)
            if out.returncode != 0:
                raise RuntimeError(f"{tag} playbook failed:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
            return elapsed

        reps = 1 if quick else 3
        tunnel_times, direct_times = [], []
        run(direct_inv, "warm-up", 99)
        for k in range(reps):
            direct_times.append(run(direct_inv, "direct", 2 * k))
            tunnel_times.append(run(tunnel_inv, "tunnel", 2 * k + 1))
        t, d = statistics.median(tunnel_times), statistics.median(direct_times)
        return [
            {"metric": "10-task playbook x 10 devices, through the tunnel", "value": round(t, 2), "unit": "s",
             "baseline": round(d, 2), "baseline_name": "direct SSH", "note": f"median of {reps}; "
             f"tunnel {[round(x, 1) for x in tunnel_times]}, direct {[round(x, 1) for x in direct_times]}"},
            {"metric": "playbook time ratio tunnel / direct SSH", "value": round(t / d, 3), "unit": "ratio",
             "target": "≤ 1.15"},
        ]
    finally:
        fleet.close()
        subprocess.run(["rm", "-rf", str(work)])


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
