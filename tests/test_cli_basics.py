"""CLI basics of both commands (issue 18): one command table per CLI (parser and completion
built from it), --version, help on every option, --format json on every command that lists or
shows something, device ids among selectors, yes/no in tables, FLEET_PROXY, an absolute identity
path in ssh_config, and shell completion scripts."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from fleet_harness import PY

from enroll import clitools, output
from enroll.cli import ENROLL
from enroll.cli import build_parser as enroll_parser
from enroll.cli import main as enroll_main
from tunnel.cli import TUNNEL
from tunnel.cli import build_parser as tunnel_parser

# Commands whose output is not a result to format: long-running servers and forwards, byte
# pipes, exec of ssh, a completion script, and 'enroll sign' (its output is the JSON bundle).
NOT_SHOWING = {
    "tunnel proxy", "tunnel agent", "tunnel proxy-command", "tunnel forward", "tunnel ssh",
    "tunnel kube", "tunnel db", "tunnel audit export", "tunnel completion", "tunnel helper run",
    "enroll sign", "enroll completion",
}


def _leaves(parser, path):
    """(command path, leaf parser) for every command that runs something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaves(child, [*path, name])


def _parsers():
    return [("tunnel", tunnel_parser()), ("enroll", enroll_parser())]


def test_every_option_and_argument_has_help():
    missing = []
    for prog, parser in _parsers():
        stack = [([prog], parser)]
        while stack:
            path, p = stack.pop()
            for action in p._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack += [([*path, n], c) for n, c in action.choices.items()]
                elif not action.help:  # SUPPRESS (hidden on purpose) is a non-empty string
                    missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_every_showing_command_offers_json():
    lacking = []
    for prog, parser in _parsers():
        for path, leaf in _leaves(parser, [prog]):
            if path in NOT_SHOWING:
                continue
            fmt = [a for a in leaf._actions if "--format" in a.option_strings]
            if not fmt or "json" not in fmt[0].choices:
                lacking.append(path)
    assert lacking == []


@pytest.mark.parametrize("prog", ["tunnel", "enroll"])
def test_version(prog):
    out = subprocess.run([PY, "-m", f"{prog}.cli", "--version"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{prog} {clitools.package_version()}"
    assert clitools.package_version() != "unknown"  # the test venv has the package installed


def test_version_without_metadata_is_unknown(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert clitools.package_version() == "unknown"


def test_split_ids_keeps_selectors():
    known = ["robot-1", "robot-2", "gpu"]
    assert clitools.split_ids(["robot-1"], known) == (["robot-1"], [])
    assert clitools.split_ids(["robot-1", "customer=acme"], known) == (["robot-1"], ["customer=acme"])
    # a bare word that is no device stays a label-exists term; syntax is never an id
    assert clitools.split_ids(["site", "!robot-2", "customer in (a,b)"], known) == (
        [], ["site", "!robot-2", "customer in (a,b)"])
    assert clitools.split_ids(["gpu"], known) == (["gpu"], [])  # an id wins over a label key


def test_table_prints_yes_no_not_python_booleans():
    import io

    out = io.StringIO()
    output.emit([{"id": "a", "online": True}, {"id": "b", "online": False}], "table", ["id", "online"], out)
    assert out.getvalue().split() == ["ID", "ONLINE", "a", "yes", "b", "no"]


# --- enroll: every listing/showing command prints valid JSON --------------------------------


def _enroll_json(capsys, state, *args) -> object:
    capsys.readouterr()
    assert enroll_main(["--state", str(state), *args, "--format", "json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_enroll_commands_print_json(fleet, tmp_path, capsys):
    state = fleet.state.root
    fleet.enroll_device("robot-1", {"customer": "acme"}, {"ssh": "127.0.0.1:22"})
    fleet.enroll_device("robot-2", {"customer": "globex"}, {"ssh": "127.0.0.1:22"})

    info = _enroll_json(capsys, tmp_path / "state2", "init", "--fleet", "f2", "--proxy-name", "p.test")
    assert info["ca_pin"].startswith("sha256:")
    token = _enroll_json(capsys, state, "token", "create", "--label", "customer=acme")
    assert [t["id"] for t in _enroll_json(capsys, state, "token", "ls")].count(token["id"]) == 1
    assert _enroll_json(capsys, state, "token", "revoke", token["id"])["status"] == "revoked"

    roles = tmp_path / "role.yaml"
    roles.write_text(yaml.safe_dump({"kind": "role", "version": "v7", "metadata": {"name": "viewer"},
                                     "spec": {"allow": {"node_labels": {"customer": "acme"},
                                                        "logins": ["root"]}}}))
    assert _enroll_json(capsys, state, "role", "apply", "-f", str(roles))["applied"] == ["viewer"]
    assert "viewer" in [r["name"] for r in _enroll_json(capsys, state, "role", "ls")]

    assert _enroll_json(capsys, state, "user", "add", "alice", "--role", "viewer")["user"] == "alice"
    assert _enroll_json(capsys, state, "user", "invite", "alice")["invite"]
    assert _enroll_json(capsys, state, "user", "roles", "alice", "--role", "admin")["roles"] == ["admin"]
    assert _enroll_json(capsys, state, "user", "lock", "alice", "--ttl", "1h")["status"] == "locked"
    assert _enroll_json(capsys, state, "user", "unlock", "alice")["status"] == "unlocked"
    assert "alice" in [u["name"] for u in _enroll_json(capsys, state, "user", "ls")]
    issued = _enroll_json(capsys, state, "user", "issue", "ops", "--role", "admin",
                          "--dir", str(tmp_path / "ops"))
    assert issued["roles"] == ["admin"]
    certs = _enroll_json(capsys, state, "cert", "ls", "--user", "ops")
    assert [c["serial"] for c in certs] == [issued["serial"]]
    assert _enroll_json(capsys, state, "cert", "revoke", issued["serial"])["revoked"] == [issued["serial"]]
    assert _enroll_json(capsys, state, "role", "rm", "viewer")["status"] == "removed"

    assert {d["id"] for d in _enroll_json(capsys, state, "devices")} == {"robot-1", "robot-2"}
    assert _enroll_json(capsys, state, "relabel", "robot-1", "site=north")["labels"]["site"] == "north"
    assert _enroll_json(capsys, state, "lock", "robot-1")["locked_until"]
    assert _enroll_json(capsys, state, "unlock", "robot-1")["locked_until"] is None
    assert _enroll_json(capsys, state, "decommission", "robot-2")["lifecycle"] == "decommissioned"
    assert _enroll_json(capsys, state, "backup", str(tmp_path / "copy.db"))["chain"]


def test_enroll_devices_accepts_ids(fleet, capsys):
    state = fleet.state.root
    for name, customer in (("robot-1", "acme"), ("robot-2", "acme"), ("robot-3", "globex")):
        fleet.enroll_device(name, {"customer": customer}, {"ssh": "127.0.0.1:22"})
    ids = lambda *sel: [d["id"] for d in _enroll_json(capsys, state, "devices", *sel)]  # noqa: E731
    assert ids("robot-2") == ["robot-2"]
    assert sorted(ids("robot-1", "robot-3")) == ["robot-1", "robot-3"]
    assert ids("robot-3", "customer=acme") == []  # ids and selectors are ANDed
    assert sorted(ids("customer=acme")) == ["robot-1", "robot-2"]  # selectors keep working
    assert ids("nosuch") == []  # a bare unknown word is still a label-exists term
    capsys.readouterr()
    assert enroll_main(["--state", str(state), "devices", "customer in (acme"]) == 1  # bad syntax
    assert "error" in capsys.readouterr().err


def test_enroll_user_issue_takes_fleet_proxy(fleet, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEET_PROXY", "proxy.example:8443")
    info = _enroll_json(capsys, fleet.state.root, "user", "issue", "ops", "--dir", str(tmp_path / "ops"))
    assert info["proxy"] == "proxy.example:8443"
    assert yaml.safe_load((tmp_path / "ops" / "client.yaml").read_text())["proxy"] == "proxy.example:8443"


# --- tunnel ---------------------------------------------------------------------------------


def test_login_proxy_from_fleet_proxy(monkeypatch, capsys):
    monkeypatch.delenv("FLEET_PROXY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        tunnel_parser().parse_args(["login", "--user", "alice"])
    assert exit_.value.code == 2 and "--proxy" in capsys.readouterr().err
    monkeypatch.setenv("FLEET_PROXY", "proxy.example:443")
    assert tunnel_parser().parse_args(["login", "--user", "alice"]).proxy == "proxy.example:443"
    args = tunnel_parser().parse_args(["login", "--user", "alice", "--proxy", "other:1"])
    assert args.proxy == "other:1"  # the option wins over the environment


def test_config_writes_absolute_identity_paths(fleet, tmp_path):
    ops = fleet.user("ops", ["admin"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = os.path.relpath(ops, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([PY, "-m", "tunnel.cli", "config", "--identity", relative, "--format", "json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    text = json.loads(out.stdout)["ssh_config"]
    assert str(ops.resolve()) in text
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("IdentityFile", "CertificateFile", "UserKnownHostsFile"):
            assert os.path.isabs(words[1].strip('"')), line
    # ... so ssh can use the written file from another directory
    out = subprocess.run([PY, "-m", "tunnel.cli", "config", "--identity", relative, "--write"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    if shutil.which("ssh"):
        check = subprocess.run(["ssh", "-G", "-F", str(ops / "ssh_config"), "root@robot-1.fleet"],
                               cwd=elsewhere, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        files = [line.split(None, 1)[1] for line in check.stdout.splitlines()
                 if line.startswith(("identityfile ", "certificatefile "))]
        assert files and all(os.path.isabs(f) for f in files), files


@pytest.fixture
def online(fleet, echo):
    """A proxy with two connected agents and an admin identity."""
    configs = [fleet.enroll_device(name, {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"},
                                   keepalive="5s") for name in ("robot-1", "robot-2")]
    fleet.enroll_device("robot-3", {"customer": "globex"}, {"echo": f"127.0.0.1:{echo.port}"})
    fleet.start_proxy()
    for config in configs:
        fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    fleet.wait_online(ops, "robot-2")
    return fleet, ops


def _tunnel_json(fleet, ops, *args):
    out = fleet.tunnel(*args, "--format", "json", identity=ops)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_tunnel_commands_print_json_and_ls_takes_ids(online):
    fleet, ops = online
    ids = lambda *sel: sorted(d["id"] for d in _tunnel_json(fleet, ops, "ls", *sel))  # noqa: E731
    assert ids() == ["robot-1", "robot-2", "robot-3"]
    assert ids("robot-2") == ["robot-2"]
    assert ids("robot-1", "robot-3") == ["robot-1", "robot-3"]
    assert ids("customer=globex") == ["robot-3"]
    assert ids("robot-1", "customer=globex") == []

    table = fleet.tunnel("ls", identity=ops)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split()[1] for line in table.stdout.decode().splitlines()[1:]}
    assert rows == {"robot-1": "yes", "robot-2": "yes", "robot-3": "no"}

    assert {a["device"] for a in _tunnel_json(fleet, ops, "status")} == {"robot-1", "robot-2"}
    assert _tunnel_json(fleet, ops, "whoami")
    assert _tunnel_json(fleet, ops, "ssh-cert", "robot-1", "root")["certificate"].endswith("-cert.pub")
    assert "Host *.fleet" in _tunnel_json(fleet, ops, "config")["ssh_config"]
    for audit, kind in (("query", list), ("verify", dict)):  # ops commands: no --identity
        out = subprocess.run([PY, "-m", "tunnel.cli", "audit", audit, "--state", str(fleet.state.root),
                              "--format", "json"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert isinstance(json.loads(out.stdout), kind)
    assert "user.crt" in _tunnel_json(fleet, ops, "logout")["removed"]


def test_engineer_commands_dial_fleet_proxy(online):
    fleet, ops = online
    client = ops / "client.yaml"
    config = yaml.safe_load(client.read_text())
    client.write_text(yaml.safe_dump({**config, "proxy": "127.0.0.1:1"}))  # a dead address
    dead = fleet.tunnel("ls", identity=ops, timeout=60)
    assert dead.returncode == 3, dead.stderr
    fleet.env["FLEET_PROXY"] = fleet.address
    assert "robot-1" in [d["id"] for d in _tunnel_json(fleet, ops, "ls")]


# --- completion -----------------------------------------------------------------------------


def _completion(prog, shell):
    out = subprocess.run([PY, "-m", f"{prog}.cli", "completion", shell], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _complete(script, prog, *words):
    """What the bash function offers for the last of ``words`` (the word being typed)."""
    cmd = (f"source /dev/stdin; COMP_WORDS=({' '.join(map(repr, [prog, *words]))}); "
           f"COMP_CWORD={len(words)}; _{prog}; echo \"${{COMPREPLY[@]}}\"")
    out = subprocess.run(["bash", "-c", cmd], input=script, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("prog", ["tunnel", "enroll"])
def test_bash_completion_is_valid_and_completes(prog, tmp_path):
    script = _completion(prog, "bash")
    path = tmp_path / "c.sh"
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    if prog == "tunnel":
        assert _complete(script, prog, "st") == ["status"]
        assert _complete(script, prog, "audit", "") == ["query", "verify", "export", "-h", "--help"]
        assert _complete(script, prog, "ls", "--for") == ["--format"]
        assert _complete(script, prog, "ls", "--format", "") == ["table", "json", "yaml"]
        assert _complete(script, prog, "audit", "verify", "--format", "") == ["text", "json"]
        assert _complete(script, prog, "completion", "") == ["bash", "zsh", "fish", "-h", "--help"]
        assert _complete(script, prog, "ls", "--identity", "") == []  # a path: the shell's own
    else:
        assert _complete(script, prog, "dev") == ["device", "devices"]
        assert _complete(script, prog, "--state", "/x", "user", "lo") == ["lock"]
        assert "--role" in _complete(script, prog, "user", "add", "--")


@pytest.mark.parametrize("prog", ["tunnel", "enroll"])
def test_zsh_and_fish_completion(prog):
    zsh = _completion(prog, "zsh")
    assert "bashcompinit" in zsh and f"complete -o default -F _{prog} {prog}" in zsh
    if shutil.which("zsh"):
        assert subprocess.run(["zsh", "-n"], input=zsh, text=True).returncode == 0
    fish = _completion(prog, "fish")
    subcommand = "status" if prog == "tunnel" else "devices"
    assert f"complete -c {prog} -n '__fish_use_subcommand' -a {subcommand} " in fish
    assert "-l format -r -f -a 'table json yaml'" in fish
    if shutil.which("fish"):
        assert subprocess.run(["fish", "-n"], input=fish, text=True).returncode == 0


# --- one command table ----------------------------------------------------------------------


def _tree(node):
    """A completion node as plain data: options, positional choices, subcommands (with help)."""
    return {"options": [(tuple(f), h, tuple(c), v) for f, h, c, v in node.options],
            "values": node.values,
            "subs": {name: (help_text, _tree(child)) for name, (help_text, child) in node.subs.items()}}


@pytest.mark.parametrize(("program", "build"), [(TUNNEL, tunnel_parser), (ENROLL, enroll_parser)],
                         ids=["tunnel", "enroll"])
def test_completion_reads_the_table_the_parser_is_built_from(program, build):
    # completion walks the table (and only an extension's own parser); argparse parses what the
    # same table built: both must see the same commands, options, choices and help
    from_table = _tree(clitools._Node.of_program(program))
    from_parser = _tree(clitools._Node.of_parser(build()))
    assert from_table == from_parser
    assert from_table["subs"]  # not trivially equal


def test_shared_groups_are_the_same_options_everywhere():
    assert clitools.FORMATS == output.FORMATS
    for prog, parser in _parsers():
        for path, leaf in _leaves(parser, [prog]):
            for action in leaf._actions:
                if action.option_strings == ["--format"] and not path.startswith("tunnel audit"):
                    assert action.help == clitools.FORMAT[0].kwargs["help"], path
                if action.option_strings == ["--state"] and not path.startswith("tunnel audit"):
                    assert action.help == clitools.STATE[0].kwargs["help"], path
    engineer = [o.flags for o in clitools.ENGINEER]
    for command in TUNNEL.commands:
        if isinstance(command, clitools.Command) and clitools.ENGINEER[0] in command.args:
            assert [a.flags for a in command.args[-2:]] == engineer, command.name


def test_enroll_state_is_taken_at_every_level(monkeypatch):
    parse = enroll_parser().parse_args
    assert parse(["token", "ls"]).state is None
    assert parse(["--state", "/a", "token", "ls"]).state == "/a"
    assert parse(["token", "--state", "/b", "ls"]).state == "/b"
    assert parse(["--state", "/a", "token", "ls", "--state", "/c"]).state == "/c"  # the nearest wins
    assert parse(["devices", "--state", "/d"]).state == "/d"


def test_every_table_command_runs_something():
    def leaves(commands, path):
        for command in commands:
            if isinstance(command, clitools.Command):
                if command.subcommands:
                    assert command.run is None, path + [command.name]
                    yield from leaves(command.subcommands, [*path, command.name])
                else:
                    yield [*path, command.name], command

    for program in (TUNNEL, ENROLL):
        for path, command in leaves(program.commands, [program.prog]):
            assert callable(command.run) and command.help, path


def test_secret_options_stay_off_argv(capsys):
    # the hidden --token/--invite/--totp still refuse a value on the command line
    with pytest.raises(SystemExit) as exit_:
        enroll_parser().parse_args(["sign", "--csr", "r.json", "--token", "fleet.secret"])
    assert exit_.value.code == 2 and "FLEET_TOKEN" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        tunnel_parser().parse_args(["login", "--proxy", "p:1", "--user", "a", "--invite", "abc"])
    assert exit_.value.code == 2 and "FLEET_INVITE" in capsys.readouterr().err


def test_the_builder_loads_only_the_standard_library():
    code = "import sys, enroll.clitools; print('\\n'.join(sys.modules))"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    loaded = {m.split(".")[0] for m in out.stdout.split()}
    assert not loaded & {"yaml", "cryptography", "sqlite_utils", "aioquic", "h2", "tunnel"}
