"""The fleet.tunnel collection: the checkout's tree, the wheel's copy and ansible-galaxy's build agree.

The top-level roles/, playbooks/ and inventory_plugin/ are the sources of truth; setup.py maps them
into ansible_collections/fleet/tunnel/ (symlinks in the checkout, copies in the wheel). These
tests fail when the two drift apart, when the collection version differs from the package
version, and when an installed wheel does not give a working collection (ansible-doc,
ansible-galaxy collection list, collection playbooks). No proxy or root needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from fleet_harness import missing_peer
from test_ansible import REPO, ansible_cmd, ansible_env

COLL = REPO / "ansible_collections" / "fleet" / "tunnel"
PLAYBOOKS = ["agent", "collect_logs", "enroll", "firmware_report", "proxy"]


def _setup_module():
    spec = importlib.util.spec_from_file_location("fleet_tunnel_setup", REPO / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines the mapping, runs no setup()
    return mod


def package_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_checkout_collection_tree_matches_the_sources():
    """Every collection file is a link to its top-level source, and nothing else is there."""
    want = _setup_module().collection_sources(REPO)
    assert "roles/tunnel_agent/tasks/main.yml" in want and "playbooks/collect_logs.yml" in want
    have = {str(p.relative_to(COLL)) for p in COLL.rglob("*")
            if p.is_symlink() or (p.is_file() and p.parent != COLL and p.parent.name != "meta")}
    missing, extra = set(want) - have, have - set(want)
    assert not missing and not extra, (
        f"collection tree drifted from roles/, playbooks/, inventory_plugin/: missing {sorted(missing)}, "
        f"extra {sorted(extra)}; run `python setup.py sync_collection`")
    for rel, src in want.items():
        assert (COLL / rel).is_symlink(), f"{rel} is a copy, not a link: run `python setup.py sync_collection`"
        assert (COLL / rel).resolve() == src.resolve(), rel


def test_galaxy_version_is_the_package_version():
    assert yaml.safe_load((COLL / "galaxy.yml").read_text())["version"] == package_version()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this tree, unpacked as pip would install it."""
    tmp = tmp_path_factory.mktemp("coll")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w",
                          str(tmp / "dist")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    site = tmp / "site"
    with zipfile.ZipFile(next((tmp / "dist").glob("fleet_tunnel-*.whl"))) as z:
        z.extractall(site)
    work = tmp / "elsewhere"
    work.mkdir()
    env = ansible_env(PYTHONPATH=site)
    env.pop("ANSIBLE_CONFIG")  # no ansible.cfg: only what the wheel installed
    return tmp, site, work, env


def test_wheel_copy_equals_the_sources(installed):
    _, site, _, _ = installed
    for rel, src in _setup_module().collection_sources(REPO).items():
        assert (site / COLL.relative_to(REPO) / rel).read_bytes() == src.read_bytes(), rel


def test_wheel_manifest_is_what_ansible_galaxy_build_writes(installed):
    tmp, site, _, _ = installed
    out = subprocess.run(ansible_cmd("ansible-galaxy", "collection", "build", COLL, "--output-path",
                                     tmp / "galaxy"), capture_output=True, text=True, timeout=120,
                         env=ansible_env())
    assert out.returncode == 0, out.stderr
    with tarfile.open(tmp / "galaxy" / f"fleet-tunnel-{package_version()}.tar.gz") as tar:
        built = {n: json.load(tar.extractfile(n)) for n in ("MANIFEST.json", "FILES.json")}
    ours = {n: json.loads((site / COLL.relative_to(REPO) / n).read_text())
            for n in ("MANIFEST.json", "FILES.json")}
    key = lambda files: sorted((f["name"], f["ftype"], f["chksum_sha256"]) for f in files["files"])  # noqa: E731
    assert key(ours["FILES.json"]) == key(built["FILES.json"])
    assert ours["MANIFEST.json"]["collection_info"] == built["MANIFEST.json"]["collection_info"]
    assert ours["MANIFEST.json"]["collection_info"]["version"] == package_version()


def test_installed_collection_works_without_ansible_cfg(installed):
    _, site, work, env = installed

    def run(tool, *args):
        out = subprocess.run(ansible_cmd(tool, *args), capture_output=True, text=True, timeout=120,
                             cwd=work, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    listed = run("ansible-galaxy", "collection", "list", "fleet.tunnel")
    assert f"fleet.tunnel {package_version()}" in " ".join(listed.split())
    for role in ("tunnel_agent", "tunnel_proxy", "fleet_enroll"):
        assert f"fleet.tunnel.{role}" in run("ansible-doc", "-t", "role", f"fleet.tunnel.{role}")
    assert "fleet.tunnel.fleet" in run("ansible-doc", "-t", "inventory", "fleet.tunnel.fleet")
    for name in PLAYBOOKS:
        out = run("ansible-playbook", "-i", "localhost,", f"fleet.tunnel.{name}", "--syntax-check")
        assert os.fspath(site / COLL.relative_to(REPO) / "playbooks" / f"{name}.yml") in out


def test_syntax_check_from_the_repo_root_with_no_inventory():
    """The repo's ansible.cfg keeps standard tooling working: no -i means implicit localhost."""
    for book in sorted((REPO / "playbooks").glob("*.yml")):
        out = subprocess.run(ansible_cmd("ansible-playbook", book, "--syntax-check"), cwd=REPO,
                             capture_output=True, text=True, timeout=120, env=ansible_env())
        assert out.returncode == 0, out.stdout + out.stderr


def test_a_broken_inventory_source_still_fails(tmp_path):
    """Strictness kept where it helps: a source given with -i that does not parse is an error,
    reported once (no yaml/ini parser noise)."""
    bad = tmp_path / "typo.fleet.yml"
    bad.write_text("plugin: fleet.tunnel.fleet\nselectr: [x]\n")
    out = subprocess.run(ansible_cmd("ansible-inventory", "-i", bad, "--graph"), cwd=REPO,
                         capture_output=True, text=True, timeout=60, env=ansible_env())
    assert out.returncode != 0, out.stdout
    assert "Completely failed to parse inventory source" in out.stderr
    assert "'yaml' plugin" not in out.stderr and "'ini' plugin" not in out.stderr, out.stderr


def test_ansible_lint_production_profile_from_the_repo_root():
    lint = Path(sys.executable).parent / "ansible-lint"
    if not lint.exists():
        missing_peer("ansible-lint is not installed (pip install 'fleet-tunnel[test]')")
    out = subprocess.run([str(lint), "--offline", "--profile", "production", "--nocolor"], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env=ansible_env())
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("case", ["no_token", "no_proxy", "no_pin"])
def test_enroll_playbook_refuses_empty_settings_before_installing(tmp_path, case):
    """An empty token, proxy or CA pin fails the play before the package install touches the device."""
    extra = {"fleet_enroll_dir": str(tmp_path / "etc"), "tunnel_agent_venv": str(tmp_path / "venv"),
             "fleet_enroll_proxy": "proxy.example.com:443", "fleet_enroll_ca_pin": "sha256:00"}
    if case == "no_proxy":
        extra["fleet_enroll_proxy"] = ""
    elif case == "no_pin":
        del extra["fleet_enroll_ca_pin"]
    env = ansible_env(FLEET_TOKEN="" if case == "no_token" else "tok-123")
    out = subprocess.run(ansible_cmd("ansible-playbook", "-i", "localhost,", "-c", "local",
                                     REPO / "playbooks" / "enroll.yml", "-e", json.dumps(extra)),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0, out.stdout
    want = {"no_token": "fleet_enroll_token is empty", "no_proxy": "fleet_enroll_proxy",
            "no_pin": "fleet_enroll_ca_pin"}[case]
    assert want in out.stdout + out.stderr, out.stdout + out.stderr
    assert not (tmp_path / "venv").exists()  # nothing installed
    assert "tok-123" not in out.stdout + out.stderr
