"""Build hook: the wheel carries the complete `fleet.tunnel` Ansible collection.

All metadata is in pyproject.toml; this file only adds one step to `build_py`. The top-level
`inventory_plugin/`, `roles/` and `playbooks/` stay the sources of truth (they are what people
edit and what `ansible.cfg` points at); the collection under `ansible_collections/fleet/tunnel/`
is derived from them by one mapping, `collection_sources()`:

- in the checkout, as per-file symlinks (`python setup.py sync_collection` writes them), so
  `collections_path = ./` and `ansible-galaxy collection build ansible_collections/fleet/tunnel`
  (which copies the targets of file links) both see the real files; tests/test_ansible.py fails
  when the links and the mapping drift apart;
- in the wheel, as plain copies written here from the sources themselves (never from the links),
  with `galaxy.yml` carrying the package version and the `MANIFEST.json`/`FILES.json` that
  `ansible-galaxy collection build` would write, so `ansible-galaxy collection list` shows the
  package version and a pip-installed collection looks like a galaxy-installed one.

Collection playbook names take underscores (`fleet.tunnel.collect_logs`): a dash is not valid in
a collection resource name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent
COLLECTION = Path("ansible_collections/fleet/tunnel")
# files that belong to the collection itself (real files in the checkout)
OWN_FILES = ("README.md", "CHANGELOG.md", "meta/runtime.yml")
# what `ansible-galaxy collection build` leaves out of FILES.json
_NOT_IN_FILES = {"galaxy.yml", "MANIFEST.json", "FILES.json"}


def collection_sources(repo: Path = REPO) -> dict[str, Path]:
    """Path inside the collection -> top-level source file (the single mapping)."""
    out: dict[str, Path] = {"plugins/inventory/fleet.py": repo / "inventory_plugin" / "fleet.py"}
    for src in sorted((repo / "roles").rglob("*")):
        if src.is_file() and "__pycache__" not in src.parts:
            out[str(Path("roles") / src.relative_to(repo / "roles"))] = src
    for src in sorted((repo / "playbooks").glob("*.yml")):
        out[f"playbooks/{src.name.replace('-', '_')}"] = src
    return out


def sync_collection(repo: Path = REPO) -> None:
    """Make the checkout's collection tree one relative symlink per source file, nothing else."""
    root = repo / COLLECTION
    want = collection_sources(repo)
    for rel, src in want.items():
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(src, link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    for sub in ("roles", "playbooks", "plugins"):
        for path in sorted((root / sub).rglob("*"), reverse=True):
            rel = str(path.relative_to(root))
            if path.is_symlink() and rel not in want:
                path.unlink()
            elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()


def _galaxy(repo: Path, version: str) -> tuple[str, dict]:
    """galaxy.yml with the package version (a version bump in pyproject.toml carries over)."""
    import yaml  # a runtime dependency, and in the build environment (see pyproject.toml)

    text = (repo / COLLECTION / "galaxy.yml").read_text()
    meta = yaml.safe_load(text)
    if meta.get("version") != version:
        text = text.replace(f"version: {meta.get('version')}", f"version: {version}", 1)
        meta["version"] = version
    return text, meta


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_collection(dest: Path, version: str, repo: Path = REPO) -> None:
    """Write the installed form of the collection into `dest` (replacing what is there)."""
    if dest.exists():
        shutil.rmtree(dest)
    files: dict[str, bytes] = {rel: (repo / COLLECTION / rel).read_bytes() for rel in OWN_FILES}
    files.update({rel: src.read_bytes() for rel, src in collection_sources(repo).items()})
    galaxy_text, meta = _galaxy(repo, version)
    dirs = sorted({str(p) for rel in files for p in Path(rel).parents if str(p) != "."})
    entries = [{"name": ".", "ftype": "dir", "chksum_type": None, "chksum_sha256": None, "format": 1}]
    entries += [{"name": d, "ftype": "dir", "chksum_type": None, "chksum_sha256": None, "format": 1}
                for d in dirs]
    entries += [{"name": rel, "ftype": "file", "chksum_type": "sha256",
                 "chksum_sha256": _sha256(data), "format": 1}
                for rel, data in sorted(files.items()) if rel not in _NOT_IN_FILES]
    files_json = json.dumps({"files": entries, "format": 1}, indent=True, sort_keys=True).encode()
    manifest = {
        "collection_info": {
            "namespace": meta["namespace"], "name": meta["name"], "version": version,
            "authors": meta.get("authors", []), "readme": meta.get("readme"),
            "tags": meta.get("tags", []), "description": meta.get("description"),
            "license": meta.get("license", []), "license_file": meta.get("license_file") or None,
            "dependencies": meta.get("dependencies", {}), "repository": meta.get("repository"),
            "documentation": meta.get("documentation"), "homepage": meta.get("homepage"),
            "issues": meta.get("issues"),
        },
        "file_manifest_file": {"name": "FILES.json", "ftype": "file", "chksum_type": "sha256",
                               "chksum_sha256": _sha256(files_json), "format": 1},
        "format": 1,
    }
    files["galaxy.yml"] = galaxy_text.encode()
    files["FILES.json"] = files_json
    files["MANIFEST.json"] = json.dumps(manifest, indent=True, sort_keys=True).encode()
    for rel, data in files.items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["sync_collection"]:
        sync_collection()
        sys.exit(0)

    from setuptools import setup
    from setuptools.command.build_py import build_py

    class BuildPyWithCollection(build_py):
        """build_py, then the complete fleet.tunnel collection into the build tree."""

        def run(self):
            super().run()
            write_collection(Path(self.build_lib) / COLLECTION, self.distribution.get_version())

    setup(cmdclass={"build_py": BuildPyWithCollection})
