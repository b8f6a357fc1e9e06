"""Shared pytest configuration.

The network lab fixtures (``lab_env``, ``lab``, ``module_lab``) live in tests/lab/fixtures.py.
``tests/`` has no ``__init__.py``, so pytest puts it on sys.path and the lab package imports
as ``lab`` (``from lab import Lab``; ``from lab.echo import UdpEcho``).

Tiers. ``lab`` tests build network namespaces (root). ``slow`` tests start processes — a proxy,
an agent, the CLIs, sshd, ansible — or hash passwords (scrypt: 0.3 s and 128 MiB each), or are
load tests; everything else runs in-process in milliseconds. ``slow`` is not written on each
test: :func:`pytest_collection_modifyitems` marks a test whose body, or a fixture it uses, or a
function of the same module either of them calls, makes one of :data:`COSTLY_CALLS` (or any
``subprocess`` call), and a test named for its load (:data:`LOAD_TEST`). So
``pytest -m "not lab and not slow"`` is the quick tier.
"""

pytest_plugins = ["lab.fixtures"]


import ast  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
from fleet_harness import EchoServer, Fleet  # noqa: E402

#: calls that make a test slow, whether called bare or as a method (``fleet.start_proxy()``);
#: besides these: anything of ``subprocess``, and ``x.start(argv, …)`` with arguments
#: (``Fleet.start``; a thread's ``start()`` takes none)
COSTLY_CALLS = frozenset({
    "Popen", "create_subprocess_exec", "create_subprocess_shell",
    # tests/fleet_harness.py: Fleet.start/start_proxy/start_agent spawn, tunnel/online/wait_online run the CLI
    "start_proxy", "start_agent", "tunnel", "wait_online", "online",
    # enroll/users.py: a real scrypt per password (N=2^17)
    "authenticate", "hash_password", "check_password",
})

#: load tests, by name
LOAD_TEST = re.compile(r"flood|storm|throughput|backpressure|soak")


def _called_names(func: ast.AST) -> tuple[bool, set[str]]:
    """(does ``func`` make a costly call itself, the bare names it calls)."""
    spawns, names = False, set()
    for node in ast.walk(func):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "subprocess":
            spawns = True
        elif isinstance(node, ast.Call):
            callee = node.func
            name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", None)
            if name in COSTLY_CALLS or (name == "start" and node.args):  # Fleet.start(argv, log)
                spawns = True
            elif isinstance(callee, ast.Name):
                names.add(callee.id)
    return spawns, names


@functools.cache
def _spawning_functions(path: str) -> frozenset[str]:
    """Names of the functions in ``path`` that make a costly call, directly or through another."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError):
        return frozenset()
    direct, calls = set(), {}
    # module-level functions and methods: each walked once, with what is nested in it
    nodes = [n for top in tree.body for n in (top.body if isinstance(top, ast.ClassDef) else [top])]
    for node in nodes:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            spawns, names = _called_names(node)
            calls.setdefault(node.name, set()).update(names)
            if spawns:
                direct.add(node.name)
    spawning, grew = set(direct), True
    while grew:
        grew = False
        for name, called in calls.items():
            if name not in spawning and called & spawning:
                spawning.add(name)
                grew = True
    return frozenset(spawning)


def _costly(func) -> bool:
    try:
        path = inspect.getsourcefile(func)
    except TypeError:
        return False
    return bool(path) and func.__name__ in _spawning_functions(path)


def pytest_collection_modifyitems(config, items):
    for item in items:
        function = getattr(item, "function", None)
        if function is None or item.get_closest_marker("slow"):
            continue
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = fixtures.name2fixturedefs.values() if fixtures else ()
        if LOAD_TEST.search(function.__name__) or _costly(function) \
                or any(_costly(d[-1].func) for d in defs if d):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _resume_only_where_asked(request, monkeypatch):
    """The engineer's ends make resumable sessions by default (issue 17). Tests written before
    assert what a lost tunnel did then (a cut at once), so a test gets resuming only when it is
    marked ``resumable``; elsewhere ``FLEET_RESUME_HOLD=0`` (inherited by every process a test
    starts) keeps the streams raw."""
    if request.node.get_closest_marker("resumable") is None:
        monkeypatch.setenv("FLEET_RESUME_HOLD", "0")


@pytest.fixture
def fleet(tmp_path):
    """A fleet state directory on loopback; its proxy/agent processes stop on teardown."""
    f = Fleet(tmp_path)
    yield f
    f.close()


@pytest.fixture
def echo():
    """A TCP echo service on loopback, standing in for a device service."""
    server = EchoServer()
    yield server
    server.close()
