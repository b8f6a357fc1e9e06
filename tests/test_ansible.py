"""Ansible: the fleet inventory plugin against a real proxy on loopback (no root needed).

The label groups, the connection settings on the parent group, RBAC (an acme engineer never
sees globex devices), caching of the raw device list, a broken config failing loudly, and the
plugin being found from an installed wheel with no ansible.cfg. The tunnel itself (playbooks
through real sshds behind NAT) and the roles are in test_ansible_lab.py.

Helpers here are shared with test_ansible_lab.py, scripts/demo and bench/cases/ansible.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROLES = """\
kind: role
version: v7
metadata: {name: acme-tech}
spec:
  allow:
    node_labels: {customer: acme}
    logins: [root]
    services: [ssh]
---
kind: role
version: v7
metadata: {name: globex-tech}
spec:
  allow:
    node_labels: {customer: globex}
    logins: [root]
    services: [ssh]
"""


def ansible_env(**extra) -> dict:
    """Environment for ansible commands: this checkout's ansible.cfg, no retry files, no colour."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORCE_COLOR": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("FLEET_IDENTITY", None)
    if Path("/usr/bin/python3").exists():
        # lab devices share this machine's filesystem; skip interpreter discovery (a pyenv shim
        # earlier on PATH may name a Python that is not installed)
        env["ANSIBLE_PYTHON_INTERPRETER"] = "/usr/bin/python3"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def ansible_cmd(tool: str, *args) -> list[str]:
    return [str(BIN / tool), *map(str, args)]


def inventory_file(directory: Path, identity: Path, name: str = "lab", **options) -> Path:
    lines = ["plugin: fleet.tunnel.fleet", f"identity: {identity}", "login: root"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in options.items()]
    path = Path(directory) / f"{name}.fleet.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines -> {host: {ok: n, changed: n, unreachable: n, failed: n, ...}}."""
    hosts = {}
    lines = output.split("PLAY RECAP", 1)[-1].splitlines()[1:]
    for line in lines:
        if ":" not in line or "=" not in line:
            continue
        host, _, rest = line.partition(":")
        hosts[host.strip()] = {k: int(v) for k, v in (kv.split("=") for kv in rest.split())}
    return hosts


# --- a loopback fleet ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from fleet_harness import Fleet

    from enroll import users

    f = Fleet(tmp_path_factory.mktemp("ansible-fleet"))
    with f.state.registry() as reg:
        users.apply_roles(reg, ROLES)
    f.start_proxy()
    devices = {"acme-1": ("acme", "1.2.0"), "acme-2": ("acme", "1.3.0"), "globex-1": ("globex", "1.2.0")}
    for name, (customer, firmware) in devices.items():
        config = f.enroll_device(name, {"customer": customer, "firmware": firmware},
                                 {"ssh": "127.0.0.1:22"}, keepalive="5s")
        if name != "acme-2":  # acme-2 stays offline
            f.start_agent(config)
    f.ops = f.user("ops", ["admin"])
    f.alice = f.user("alice", ["acme-tech"])
    for name in ("acme-1", "globex-1"):
        f.wait_online(f.ops, name, timeout=20)
    yield f
    f.close()


def inventory(path: Path, *args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(ansible_cmd("ansible-inventory", "-i", path, *args), capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env or ansible_env())


def plain(value):
    """Drop the ``__ansible_unsafe`` markers of ``--export`` (strings from the plugin are untrusted)."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def graph_groups(text: str) -> dict[str, set[str]]:
    """ansible-inventory --graph -> {group: {hosts directly in it}}."""
    groups: dict[str, set[str]] = {}
    stack: list[str] = []
    for line in text.splitlines():
        depth = line.count("|")
        name = re.sub(r"^[\s|]*(--)?", "", line).strip()
        if name.startswith("@"):
            stack = stack[:depth] + [name[1:-1]]
            groups.setdefault(name[1:-1], set())
        elif name:
            groups[stack[depth - 1]].add(name)
    return groups


def test_graph_has_label_and_online_groups(fleet, tmp_path):
    out = inventory(inventory_file(tmp_path, fleet.ops), "--graph")
    assert out.returncode == 0, out.stderr
    groups = graph_groups(out.stdout)
    assert groups["label_customer_acme"] == {"acme-1", "acme-2"}
    assert groups["label_customer_globex"] == {"globex-1"}
    assert groups["label_firmware_1_2_0"] == {"acme-1", "globex-1"}  # sanitized: 1.2.0 -> 1_2_0
    assert groups["fleet_online"] == {"acme-1", "globex-1"}
    assert groups["fleet_offline"] == {"acme-2"}


def test_host_vars_and_connection_settings_on_the_parent_group(fleet, tmp_path):
    out = inventory(inventory_file(tmp_path, fleet.ops), "--list", "--export")
    assert out.returncode == 0, out.stderr
    data = plain(json.loads(out.stdout))
    hostvars = data["_meta"]["hostvars"]
    acme1 = hostvars["acme-1"]
    assert acme1["ansible_host"] == "acme-1"
    assert acme1["fleet_labels"] == {"customer": "acme", "firmware": "1.2.0", "lifecycle": "active"}
    assert acme1["fleet_online"] is True and acme1["fleet_lifecycle"] == "active"
    assert acme1["fleet_last_seen"]
    assert hostvars["acme-2"]["fleet_online"] is False
    # nothing per device: the connection settings sit once on the parent group
    assert not any(k.startswith("ansible_ssh") for h in hostvars.values() for k in h)
    group_vars = data["fleet"]["vars"]
    config = fleet.ops / "ssh_config.all"
    assert group_vars["ansible_ssh_common_args"] == f"-F {config}"
    assert group_vars["ansible_user"] == "root"
    text = config.read_text()
    assert "ProxyCommand" in text and "helper_client.py dial %n %p" in text
    assert 'exec "' in text and "cert %n %r" in text
    assert f"UserKnownHostsFile {fleet.ops}/known_hosts" in text
    assert (fleet.ops / "known_hosts").read_text().startswith("@cert-authority * ")


def test_acme_engineer_sees_no_globex_device(fleet, tmp_path):
    out = inventory(inventory_file(tmp_path, fleet.alice), "--list")
    assert out.returncode == 0, out.stderr
    data = plain(json.loads(out.stdout))
    assert sorted(data["_meta"]["hostvars"]) == ["acme-1", "acme-2"]
    assert "label_customer_globex" not in data


def test_selector_online_only_and_constructed_options(fleet, tmp_path):
    path = inventory_file(tmp_path, fleet.ops, selector=["firmware=1.2.0"], online_only=True,
                          keyed_groups=[{"key": "fleet_labels.customer", "prefix": "customer"}],
                          groups={"old_firmware": "fleet_labels.firmware is version('1.3.0', '<')"},
                          compose={"fw": "fleet_labels.firmware"}, label_groups=False)
    out = inventory(path, "--list")
    assert out.returncode == 0, out.stderr
    data = plain(json.loads(out.stdout))
    assert sorted(data["_meta"]["hostvars"]) == ["acme-1", "globex-1"]
    assert data["customer_acme"]["hosts"] == ["acme-1"]
    assert sorted(data["old_firmware"]["hosts"]) == ["acme-1", "globex-1"]
    assert data["_meta"]["hostvars"]["globex-1"]["fw"] == "1.2.0"
    assert not any(g.startswith("label_") for g in data)


def test_compose_sees_inventory_hostname_and_parent_group_names_its_children(fleet, tmp_path):
    path = inventory_file(tmp_path, fleet.ops, parent_group="acme", label_groups=False,
                          compose={"ansible_host": "inventory_hostname ~ '.fleet'",
                                   "short": "inventory_hostname_short"})
    out = inventory(path, "--list")
    assert out.returncode == 0, out.stderr
    data = plain(json.loads(out.stdout))
    assert data["_meta"]["hostvars"]["acme-1"]["ansible_host"] == "acme-1.fleet"
    assert data["_meta"]["hostvars"]["acme-1"]["short"] == "acme-1"
    assert sorted(data["acme"]["children"]) == ["acme_offline", "acme_online"]
    assert "fleet_online" not in data and "fleet_offline" not in data


def test_cache_holds_the_raw_device_list(fleet, tmp_path):
    from enroll import admin

    cache = tmp_path / "cache"
    options = dict(cache=True, cache_plugin="ansible.builtin.jsonfile", cache_connection=str(cache),
                   cache_timeout=3600)
    path = inventory_file(tmp_path, fleet.ops, **options)
    first = inventory(path, "--list")
    assert first.returncode == 0, first.stderr
    files = list(cache.iterdir())
    assert len(files) == 1
    raw = json.loads(files[0].read_text())
    raw = json.loads(raw["__payload__"]) if "__payload__" in raw else raw  # 2.19 wraps the value
    assert {d["id"] for d in raw} == {"acme-1", "acme-2", "globex-1"}
    with fleet.state.registry() as reg:
        admin.relabel(reg, "acme-1", {"site": "hou"}, [])
    try:
        cached = plain(json.loads(inventory(path, "--list").stdout))
        assert "label_site_hou" not in cached  # from the cache: the proxy was not asked
        fresh = plain(json.loads(inventory(path, "--list", "--flush-cache").stdout))
        assert fresh["label_site_hou"]["hosts"] == ["acme-1"]
    finally:
        with fleet.state.registry() as reg:
            admin.relabel(reg, "acme-1", {}, ["site"])
    # cached per identity: alice's listing is never served from ops's entry
    alice = inventory_file(tmp_path, fleet.alice, name="alice", **options)
    out = inventory(alice, "--list")
    assert out.returncode == 0, out.stderr
    assert sorted(plain(json.loads(out.stdout))["_meta"]["hostvars"]) == ["acme-1", "acme-2"]
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("case", ["no_identity", "proxy_down", "unknown_option", "bad_selector"])
def test_broken_inventory_fails_loudly(fleet, tmp_path, case):
    if case == "no_identity":
        path = inventory_file(tmp_path, tmp_path / "nobody")
        want = "no engineer identity"
    elif case == "proxy_down":
        path = inventory_file(tmp_path, fleet.ops, proxy="127.0.0.1:9", timeout=2)
        want = "fleet inventory"
    elif case == "unknown_option":
        path = inventory_file(tmp_path, fleet.ops, selectr=["customer=acme"])
        want = "selectr"
    else:
        path = inventory_file(tmp_path, fleet.ops, selector=["customer in acme"])
        want = "selector"
    out = inventory(path, "--graph")
    assert out.returncode != 0, out.stdout
    assert want in out.stderr, out.stderr
    assert "Unable to parse" in out.stderr or "ERROR" in out.stderr


def test_plugin_is_found_from_an_installed_wheel_without_ansible_cfg(fleet, tmp_path):
    """`pip install fleet-tunnel[controller]` ships the fleet.tunnel collection in site-packages."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w",
                          str(tmp_path / "dist")], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    wheel = next((tmp_path / "dist").glob("fleet_tunnel-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "ansible_collections/fleet/tunnel/plugins/inventory/fleet.py" in names
        z.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = ansible_env(PYTHONPATH=site)
    env.pop("ANSIBLE_CONFIG")  # no ansible.cfg at all: only what the wheel installed
    path = inventory_file(work, fleet.ops, name="plain")
    out = inventory(path, "--graph", cwd=work, env=env)
    assert out.returncode == 0, out.stderr
    assert "label_customer_acme" in out.stdout


def test_cli_tunnel_ls_matches_inventory(fleet, tmp_path):
    out = fleet.tunnel("ls", "--format", "json", identity=fleet.alice)
    assert out.returncode == 0, out.stderr
    listed = sorted(d["id"] for d in plain(json.loads(out.stdout)))
    inv = plain(json.loads(inventory(inventory_file(tmp_path, fleet.alice), "--list").stdout))
    assert listed == sorted(inv["_meta"]["hostvars"])
