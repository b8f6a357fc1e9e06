"""The layers of enroll/, tunnel/ and inventory_plugin/: imports go down only, never in a circle.

Every module has a place in :data:`LAYERS`, one table read bottom-up. A module may import a
module of its own layer or of a layer of lower rank; layers of the same rank stand side by
side and do not import each other (storage never imports transport; the agent, the proxy and
the engineer's client never import one another). ``enroll`` never imports ``tunnel``. Imports
are read with ``ast`` from the source, all of them: at the top, inside functions, under
``TYPE_CHECKING``. A new module fails :func:`test_every_module_has_a_layer` until it is given
its place here (and in the README's layout section when it opens a new layer).

What a device runs (``tunnel agent``, ``enroll device``) loads only the core, the support
helpers, identity, the transport and the agent (:data:`DEVICE_LAYERS`), plus the command's own
CLI modules; checked statically here and at run time below (``tests/transport/test_imports.py`` checks the heavy
third-party pieces: h2, aioquic.asyncio, SQLite).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("enroll", "tunnel", "inventory_plugin")

#: (rank, layer, what it is, modules) from the bottom up; ``P.*``: every module under package P
LAYERS: list[tuple[int, str, str, set[str]]] = [
    (0, "core", "pure: no I/O, no project imports above it", {
        "enroll.errors", "enroll.durations", "enroll.addresses", "enroll.names", "enroll.events",
        "enroll.labels", "enroll.roles", "tunnel.wire", "tunnel.backoff", "tunnel.sshwire",
        "tunnel.ratelimit", "tunnel.helper_protocol", "tunnel.resume",
    }),
    (0, "support", "small standard-library helpers with I/O: files, logging, memory", {
        "enroll.files", "tunnel.log", "tunnel.memory",
    }),
    (1, "identity", "keys, certificates, enrollment requests and bundles, the device side", {
        "enroll.certs", "enroll.request", "enroll.device", "enroll.online",
    }),
    (2, "storage", "the CA host's state directory and the registry (SQLite)", {
        "enroll.state", "enroll.registry", "enroll.audit", "enroll.tokens", "enroll.users",
        "enroll.admin", "enroll.backup", "enroll.repositories", "enroll.snapshot", "enroll.session_log",
    }),
    (2, "transport", "QUIC and TLS/TCP connections, streams, stream headers, splicing", {
        "tunnel.transport", "tunnel.transport.*", "tunnel.protocol", "tunnel.splice",
        "tunnel.resumable",
    }),
    (3, "policy", "who may connect, open a session, or get a certificate", {
        "tunnel.access", "tunnel.admission", "enroll.enrollment",
    }),
    (4, "agent", "the device's agent and its config", {
        "tunnel.agent", "tunnel.agent_config", "tunnel.agent_decisions", "tunnel.agent_sessions",
    }),
    (4, "proxy", "the proxy, its registry writer and metrics", {
        "tunnel.proxy", "tunnel.proxy_core", "tunnel.proxy_agents", "tunnel.proxy_sessions",
        "tunnel.proxy_enroll", "tunnel.proxy_resume", "tunnel.registry_writer", "tunnel.metrics",
        "tunnel.live_policy",
    }),
    (4, "engineer", "the engineer's client and tools", {
        "tunnel.client", "tunnel.engineer", "tunnel.helper", "tunnel.helper_client",
    }),
    (5, "cli", "commands: tunnel, enroll, tunnel audit (ops), the Ansible inventory plugin", {
        "tunnel.cli", "tunnel.audit_cmd", "tunnel.helper_cmd", "tunnel.enroll_cli", "enroll.cli", "enroll.clitools",
        "enroll.output", "enroll.secret_input", "inventory_plugin.fleet",
    }),
]

DEVICE_LAYERS = {"core", "support", "identity", "transport", "agent"}


def _layer_of(modules: set[str]) -> tuple[dict[str, tuple[int, str]], list[str]]:
    """(module → (rank, layer) as the table places it, directly or by package; stale entries)."""
    where: dict[str, tuple[int, str]] = {}
    stale = []
    for rank, layer, _, entries in LAYERS:
        for entry in sorted(entries):
            named = {m for m in modules if m.startswith(entry[:-1])} if entry.endswith(".*") \
                else {entry} & modules
            if not named:
                stale.append(entry)
            for module in named:
                assert module not in where, f"{module} is in two layers"
                where[module] = (rank, layer)
    return where, stale


def _sources() -> dict[str, tuple[Path, bool]]:
    """module name → (file, is a package)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _is_empty(tree: ast.Module) -> bool:
    """A package ``__init__`` with nothing but a docstring belongs to no layer."""
    body = tree.body[1:] if tree.body and isinstance(tree.body[0], ast.Expr) else tree.body
    return not body


def _resolve(name: str, known: set[str]) -> str | None:
    """The project module ``name`` names (the longest known prefix), or None (not ours)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, is_package: bool, known: set[str]) -> set[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file, at any depth.

    ``from P import x`` is an import of ``P.x`` when that is a module, else of ``P``; a
    submodule's import of its parent package's ``__init__`` happens implicitly and is not counted.
    """
    tree = ast.parse(path.read_text(), str(path))
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, known)
                if target:
                    found.add((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}", known) if f"{base}.{alias.name}" in known \
                    else _resolve(base, known)
                if target:
                    found.add((target, node.lineno))
    found.discard((module, 0))
    return {(target, line) for target, line in found if target != module}


def _graph() -> tuple[dict[str, set[tuple[str, int]]], dict[str, Path]]:
    sources = _sources()
    known = set(sources)
    graph, files = {}, {}
    for module, (path, is_package) in sources.items():
        if is_package and _is_empty(ast.parse(path.read_text())):
            continue
        graph[module] = imports_of(module, path, is_package, known)
        files[module] = path
    return graph, files


GRAPH, FILES = _graph()
LAYER_OF, STALE = _layer_of(set(GRAPH))


def test_every_module_has_a_layer_and_the_table_names_only_real_modules():
    missing = sorted(set(GRAPH) - set(LAYER_OF))
    assert not missing, (f"modules without a layer: {missing}: add each to LAYERS in "
                         "tests/test_layers.py (and to the README's layout section)")
    assert not STALE, f"LAYERS names modules that do not exist (any more): {STALE}"


def test_imports_only_go_down():
    upward = []
    for module, targets in GRAPH.items():
        rank, layer = LAYER_OF[module]
        for target, line in sorted(targets):
            if target not in LAYER_OF:
                continue  # reported by the test above
            target_rank, target_layer = LAYER_OF[target]
            if target_layer != layer and target_rank >= rank:
                upward.append(f"{FILES[module].relative_to(ROOT)}:{line}: {module} ({layer}) "
                              f"imports {target} ({target_layer})")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_enroll_never_imports_tunnel():
    found = [f"{FILES[m].relative_to(ROOT)}:{line}: {m} imports {t}"
             for m, targets in GRAPH.items() if m.split(".")[0] == "enroll"
             for t, line in sorted(targets) if t.split(".")[0] != "enroll"]
    assert not found, "enroll is the lower package:\n" + "\n".join(found)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, …, a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_no_import_circles():
    cycle = find_cycle({m: {t for t, _ in targets} for m, targets in GRAPH.items()})
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_are_for(tmp_path):
    # the circle finder and the resolver on made-up input: a broken check would pass anything
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    src = tmp_path / "m.py"
    src.write_text("import enroll.state\nfrom tunnel import agent, nothing\n"
                   "def f():\n    from .splice import x\n    import os\n")
    known = {"enroll.state", "tunnel", "tunnel.agent", "tunnel.splice"}
    assert {t for t, _ in imports_of("tunnel.m", src, False, known)} == \
        {"enroll.state", "tunnel.agent", "tunnel", "tunnel.splice"}


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(t for t, _ in GRAPH.get(module, ()))
    return seen


def test_the_agent_reaches_only_device_layers():
    beyond = sorted(f"{m} ({LAYER_OF[m][1]})" for m in _closure("tunnel.agent")
                    if LAYER_OF[m][1] not in DEVICE_LAYERS)
    assert not beyond, f"tunnel.agent reaches modules a device must not need: {beyond}"


def test_online_enrollment_reaches_only_device_layers():
    beyond = sorted(m for m in _closure("enroll.online") if LAYER_OF[m][1] not in DEVICE_LAYERS)
    assert not beyond


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return {m for m in out.split() if m.split(".")[0] in PACKAGES}


def test_tunnel_agent_command_loads_only_device_layers():
    loaded = _loaded_after(
        "from tunnel import cli\ncli.build_parser(agent_only=True).parse_args(['agent', '--config', 'x'])\n"
        "import tunnel.agent"
    )
    assert "tunnel.agent" in loaded
    layers = {m: LAYER_OF[m][1] for m in loaded if m in LAYER_OF}
    beyond = sorted(f"{m} ({layer})" for m, layer in layers.items()
                    if layer not in DEVICE_LAYERS | {"cli"})
    assert not beyond, f"`tunnel agent` loads: {beyond}"
    commands = {m for m, layer in layers.items() if layer == "cli"}
    assert commands <= {"tunnel.cli", "enroll.clitools", "enroll.output", "enroll.secret_input"}


def test_enroll_device_loads_only_device_layers(tmp_path):
    loaded = _loaded_after(
        "from enroll.cli import main\n"
        f"assert main(['device', '--dir', {str(tmp_path / 'd')!r}, '--csr-only']) == 0"
    )
    layers = {m: LAYER_OF[m][1] for m in loaded if m in LAYER_OF}
    beyond = sorted(f"{m} ({layer})" for m, layer in layers.items()
                    if layer not in DEVICE_LAYERS | {"cli"})
    assert not beyond, f"`enroll device` loads: {beyond}"
    assert {m for m, layer in layers.items() if layer == "cli"} <= \
        {"enroll.cli", "enroll.clitools", "enroll.output", "enroll.secret_input"}


def test_enroll_alone_has_no_transport_and_says_what_to_run(tmp_path):
    """``python -m enroll.cli device --proxy`` cannot dial (enroll knows no transport): refused."""
    token = tmp_path / "token"
    token.write_text("ft1.acme.0123456789.x\n")
    argv = ["device", "--dir", str(tmp_path / "d"), "--proxy", "127.0.0.1:9",
            "--ca-pin", "sha256:" + "0" * 64, "--token-file", str(token)]
    out = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom enroll.cli import main\nstatus = main(sys.argv[1:])\n"
         "print(sorted(m for m in sys.modules if m.startswith('tunnel')))\nsys.exit(status)", *argv],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1, out
    assert "run the installed 'enroll' command" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout.strip() == "[]"  # nothing of tunnel/ was loaded to get there
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_tunnel_audit_without_the_server_extra_says_what_to_install(tmp_path):
    """An ops command on a host without the registry code: a clear refusal, not a vanished command."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys\nsys.modules['sqlite_utils'] = None  # not installed\n"
         "from tunnel.cli import main\nsys.exit(main(sys.argv[1:]))",
         "audit", "verify", "--state", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1, out
    assert "pip install 'fleet-tunnel[server]'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("module", ["enroll.durations", "enroll.addresses", "enroll.names",
                                    "enroll.events", "enroll.errors"])
def test_the_new_core_modules_import_nothing_but_the_error_root(module):
    assert {t for t, _ in GRAPH[module]} <= {"enroll.errors"}
