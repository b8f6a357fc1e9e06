"""``tunnel``: run the proxy or the agent, and reach devices through them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from enroll import clitools, output
from enroll.addresses import split_host_port
from enroll.clitools import ENGINEER, FORMAT, STATE, Command, Extension, Program, Refused, opt
from enroll.durations import parse_duration
from enroll.errors import EXIT_OK, EXIT_REFUSED, EXIT_RETIRED, EXIT_UNAVAILABLE, FleetError
from enroll.labels import parse_selector
from tunnel import log as tlog
from tunnel.transport import TransportError

if TYPE_CHECKING:  # the engineer client loads in the engineer commands only, never in `tunnel agent`
    from tunnel.client import UserIdentity


EPILOG = """\
exit status:
  0  success
  1  refused: the message on stderr says what was wrong (a denied dial, an unknown
     device or service, an expired certificate) and what to do
  2  usage error
  3  the proxy could not be reached, or the connection to it ended
  4  a session was cut: it was open and did not end cleanly (the data may be incomplete)

Engineer commands read the identity directory --identity, else $FLEET_IDENTITY,
else ~/.config/fleet-tunnel (user.crt, user.key, ca.crt, client.yaml), and dial
the proxy --proxy, else $FLEET_PROXY, else the one in client.yaml.
For OpenSSH:  ssh -o ProxyCommand='tunnel proxy-command %h %p' LOGIN@DEVICE
"""

LS_COLUMNS = ["id", "online", "lifecycle", "labels", "address", "last_seen"]
STATUS_COLUMNS = ["device", "path", "transport", "connected_since", "sessions",
                  "bytes_to_device", "bytes_from_device", "migrations_total", "reconnects"]


def _run(coro) -> None:
    """Run until done or SIGTERM/SIGINT, then cancel cleanly."""

    async def main():
        task = asyncio.create_task(coro)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


# --- ops: proxy and agent -------------------------------------------------------------------


def cmd_proxy(args) -> int:
    from enroll.state import FleetState, default_state_dir  # the CA host's: never on a device
    from tunnel.memory import tune_allocator
    from tunnel.proxy import Proxy

    tune_allocator()  # before the proxy allocates its buffers or starts a thread (tunnel/memory.py)
    tlog.setup(args.log_format, args.log_level)
    state = FleetState(Path(args.state) if args.state else default_state_dir())
    host, port = split_host_port(args.listen, "--listen")
    state.config  # noqa: B018 — a missing state fails here with its clear message
    anchor_every = parse_duration(args.anchor_every).total_seconds()
    anchor_dir = Path(args.anchor_dir) if args.anchor_dir else None
    if anchor_dir is not None and not (anchor_dir.is_dir() and os.access(anchor_dir, os.W_OK | os.X_OK)):
        raise Refused(f"--anchor-dir {anchor_dir} is not a writable directory: create it (on "
                         "storage that is shipped off this host or write-once) or fix its permissions")
    if args.anonymous_rate <= 0:
        raise Refused("--anonymous-rate must be a positive number of requests per second")
    from tunnel import metrics

    metrics_at = metrics.parse_listen(args.metrics_listen) if args.metrics_listen else None
    resume_hold = _hold_seconds(args.resume_hold, "--resume-hold")

    async def serve():
        proxy = Proxy(state, anonymous_rate=args.anonymous_rate)
        proxy.anchor_dir, proxy.anchor_every = anchor_dir, anchor_every
        proxy.resume_hold = resume_hold
        # metrics first: a port in use fails before the proxy listens (/healthz: 503 until it does)
        scrape = await metrics.serve(proxy.metrics, *metrics_at) if metrics_at else None
        try:
            await proxy.start(host, port, idle_timeout=args.idle_timeout)
            try:
                await asyncio.Event().wait()
            finally:
                await proxy.stop()
        finally:
            if scrape is not None:
                scrape.close()

    _run(serve())
    return EXIT_OK


def _hold_seconds(text: str, flag: str) -> float:
    """A hold time: ``0`` (off), seconds, or a duration (``90s``, ``10m``)."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = parse_duration(text).total_seconds()
    if not 0 <= seconds < float("inf"):
        raise Refused(f"{flag} {text!r}: give seconds or a duration such as 10m (0 turns resuming off)")
    return seconds


def cmd_agent(args) -> int:
    from tunnel import agent_config
    from tunnel.agent import Agent

    tlog.setup(args.log_format, args.log_level)
    config = agent_config.load(args.config)
    agent = Agent(config)

    async def run():
        try:
            await agent.run()
        finally:
            agent.stop()

    _run(run())
    # refused for good (decommissioned, revoked, unknown): a service manager should not restart
    # it (systemd: RestartPreventExitStatus=5); distinct from every engineer command's status
    return EXIT_RETIRED if agent.retired else EXIT_OK


# --- engineers ------------------------------------------------------------------------------


def _identity(args) -> UserIdentity:
    """The engineer identity: --identity, else $FLEET_IDENTITY, else the XDG default, made
    absolute (ssh_config and kubeconfig entries name files in it and are used from any
    directory); the proxy is --proxy, else $FLEET_PROXY, else client.yaml's."""
    from tunnel.client import UserIdentity, default_identity_dir

    directory = Path(args.identity) if args.identity else default_identity_dir()
    proxy = args.proxy or os.environ.get("FLEET_PROXY") or None
    return UserIdentity.load(directory.expanduser().absolute(), proxy)


async def _with_client(args, fn):
    from tunnel.client import Client

    client = await Client.connect(_identity(args))
    try:
        return await fn(client)
    finally:
        client.close()
        await client.conn.wait_close_sent()  # the proxy hears the close, not its idle timeout


def cmd_proxy_command(args) -> int:
    from tunnel.client import ClientError, proxy_command, tell_ssh

    try:
        identity = _identity(args)
    except (ClientError, ValueError) as exc:  # no identity, a bad --proxy: ssh shows why too
        tell_ssh(exc)
        raise
    asyncio.run(proxy_command(identity, args.device, args.target, args.login))
    return EXIT_OK


def _forward(identity: UserIdentity, device: str, service: str, host: str, port: int, ready, check: bool) -> None:
    """Through the per-user helper (it serves the listening socket this command binds), else
    directly, as before the helper: ``FLEET_HELPER=off``, or no helper can be had."""
    from tunnel import engineer
    from tunnel.client import forward

    if not engineer.forward_via_helper(identity, device, service, host, port, ready, check):
        _run(forward(identity, device, service, host, port, ready, check))


def cmd_forward(args) -> int:
    host, port = split_host_port(args.local, "--local", allow_zero=True)

    def ready(addr):
        print(f"forwarding {addr[0]}:{addr[1]} -> {args.device}/{args.service}", file=sys.stderr, flush=True)

    _forward(_identity(args), args.device, args.service, host, port, ready, args.check)
    return EXIT_OK


def cmd_ls(args) -> int:
    # bad selector syntax fails before dialing; bare words may be ids, checked once listed
    parse_selector([a for a in args.selector if not clitools.is_bare(a)])
    body = _request(args, "ls")
    devices = body["devices"]
    # a bare argument naming a device you may reach is that device; the rest is a selector
    ids, terms = clitools.split_ids(args.selector, (d["id"] for d in devices))
    selector = parse_selector(terms)
    rows = [d for d in devices if (not ids or d["id"] in ids) and selector.matches(d["labels"])]
    output.emit(rows, args.format, LS_COLUMNS)
    if not rows and args.selector and args.format == "table":
        print(f"no device you may reach matches {' '.join(args.selector)}", file=sys.stderr)
    return EXIT_OK


def _request(args, name: str) -> dict:
    """A read-only proxy request over the per-user helper's warm connection, else directly."""
    from tunnel import engineer

    body = engineer.helper_request(_identity(args), name)
    return body if body is not None else asyncio.run(_with_client(args, lambda c: c.request(name)))


def cmd_status(args) -> int:
    from tunnel.client import ClientError

    body = _request(args, "status")
    agents = body["agents"]
    if args.device:
        agents = [a for a in agents if a["device"] == args.device]
        if not agents:
            raise ClientError(f"device {args.device} is not connected (or not yours to see)")
    output.emit(agents, args.format, STATUS_COLUMNS)
    return EXIT_OK


def cmd_login(args) -> int:
    import getpass

    from tunnel import engineer
    from tunnel.client import ClientError, default_identity_dir

    directory = Path(args.identity) if args.identity else default_identity_dir()
    # Secrets never come from argv (any local user reads /proc/PID/cmdline): the invite and the
    # one-time code from a file, stdin or $FLEET_INVITE/$FLEET_TOTP, the password from stdin or
    # the terminal. Only one of them can be the piped stdin.
    piped = [flag for flag, on in (("--invite-file -", args.invite_file == "-"),
                                   ("--totp-file -", args.totp_file == "-"),
                                   ("--password-stdin", args.password_stdin)) if on]
    if len(piped) > 1 and not sys.stdin.isatty():
        raise ClientError(f"{' and '.join(piped)} would all read stdin: pass the invite in $FLEET_INVITE "
                          "and the code in $FLEET_TOTP (or in files) instead")
    from enroll.secret_input import read_secret

    invite = read_secret("invite", file=args.invite_file, env="FLEET_INVITE")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("new password: " if invite else "password: ")
        if invite and getpass.getpass("again: ") != password:
            raise ClientError("the passwords differ")
    totp = read_secret("one-time code", file=args.totp_file, env="FLEET_TOTP")
    info = asyncio.run(engineer.login(
        directory, args.proxy, args.user, password, invite=invite, totp=totp,
        ca_pin=args.ca_pin, ttl=args.ttl, server_name=args.server_name,
    ))
    if args.format != "table":
        output.emit(info, args.format)
    else:
        print(f"logged in as {info['user']} (roles: {', '.join(info['roles']) or 'none'}) "
              f"until {info['expires']}")
    return EXIT_OK


def cmd_logout(args) -> int:
    from tunnel import engineer
    from tunnel.client import default_identity_dir

    removed = engineer.logout(Path(args.identity) if args.identity else default_identity_dir())
    if args.format != "table":
        output.emit({"removed": list(removed)}, args.format)
    else:
        print("logged out" + (f" (removed {', '.join(removed)})" if removed else " (nothing to remove)"))
    return EXIT_OK


def cmd_whoami(args) -> int:
    body = _request(args, "whoami")
    output.emit(body, args.format)
    return EXIT_OK


def cmd_ssh_cert(args) -> int:
    from tunnel import engineer

    identity = _identity(args)
    path = engineer.helper_ssh_cert(identity, args.device, args.login) \
        or asyncio.run(engineer.fetch_ssh_cert(identity, args.device, args.login))
    if args.format != "table":
        output.emit({"device": args.device, "login": args.login, "certificate": str(path)}, args.format)
    elif args.print_path:
        print(path)
    return EXIT_OK


def cmd_config(args) -> int:
    from tunnel import engineer

    identity = _identity(args)
    engineer.ensure_ssh_key(identity)
    text = engineer.ssh_config(identity, args.hosts)
    path = engineer.write_ssh_config(identity, args.hosts) if args.write else None
    if args.format != "table":
        output.emit({"hosts": args.hosts, "path": str(path) if path else None, "ssh_config": text},
                    args.format)
    elif path:
        print(f"wrote {path}; use it with: ssh -F {path} LOGIN@DEVICE  (or Include it)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_ssh(args) -> int:
    """OpenSSH as a child whose stderr alone is filtered: a tunnel refusal becomes one line.

    stdin, stdout and the terminal are ssh's own (interactive use is unchanged); its stderr
    passes through line by line as it comes, except ssh's report of the disconnect that
    ``tunnel proxy-command`` sends when refused (see ``tunnel.sshwire``), which becomes
    ``tunnel: error: REASON`` and exit status 1 (3: the proxy is unreachable) instead of 255.
    """
    import select
    import subprocess

    from tunnel import engineer, sshwire

    argv = engineer.ssh_argv(_identity(args), args.target, args.command, args.ssh_option)
    try:
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    except OSError as exc:
        raise Refused(f"cannot run {argv[0]}: {exc.strerror or exc}: install the OpenSSH client") from None
    # ssh owns the terminal: ^C and ^\ reach it (same process group); we only wait for it
    # and pass on what asks us to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    stderr = proc.stderr
    assert stderr is not None  # Popen(stderr=PIPE) above
    filt, err, fd = sshwire.StderrFilter(), sys.stderr.buffer, stderr.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        data = os.read(fd, 65536) if ready else None
        if data:
            err.write(filt.feed(data))
            err.flush()
        elif data == b"" or proc.poll() is not None:
            # EOF, or ssh exited while something it started (a ControlPersist master)
            # still holds the pipe: stop once nothing more is waiting
            if data is None and select.select([fd], [], [], 0)[0]:
                continue
            break
    err.write(filt.finish())
    err.flush()
    stderr.close()
    status = proc.wait()
    if filt.exit_status is not None:
        return filt.exit_status
    return status if status >= 0 else 128 - status


def _ssh_option(value: str) -> str:
    """``-o Name=value`` as one ssh argument."""
    return f"-o{value}"


def cmd_kube(args) -> int:
    from tunnel import engineer

    identity = _identity(args)
    host, port = split_host_port(args.local, "--local", allow_zero=True)
    kubeconfig = Path(args.kubeconfig or Path.home() / ".kube" / "config")

    def path(value):
        return Path(value) if value else None

    # checked before anything is dialed or written: kubectl must never prompt for a username
    user = engineer.kube_user(path(args.client_certificate), path(args.client_key), path(args.token_file))
    merged: list = []  # the current-context we replaced, once our context is written

    def ready(addr):
        entry = engineer.kubeconfig_entry(args.device, addr[1], path(args.certificate_authority),
                                          args.tls_server_name, user)
        kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        merged.append(engineer.merge_kubeconfig(kubeconfig, args.device, entry))
        print(f"kubeconfig context fleet-{args.device} -> 127.0.0.1:{addr[1]} in {kubeconfig}; "
              "keep this running while you use kubectl (the context is removed when this ends)",
              file=sys.stderr, flush=True)

    try:
        _forward(identity, args.device, args.service, host, port, ready, args.check)
    finally:
        if merged:  # ended (Ctrl-C, SIGTERM, the proxy gone): leave no context at a dead port
            engineer.unmerge_kubeconfig(kubeconfig, args.device, merged[0])
    return EXIT_OK


def cmd_db(args) -> int:
    host, port = split_host_port(args.local, "--local", allow_zero=True)

    def ready(addr):
        user = f"{args.db_user}@" if args.db_user else ""
        print(f"postgresql://{user}{addr[0]}:{addr[1]}/{args.database or ''}", flush=True)
        print(f"forwarding to {args.device}/{args.service}; Ctrl-C to stop", file=sys.stderr, flush=True)

    _forward(_identity(args), args.device, args.service, host, port, ready, args.check)
    return EXIT_OK


# --- the command table ----------------------------------------------------------------------

LOGGING = (
    opt("--log-format", choices=("text", "json"), default="text",
        help="log lines on stderr as text or JSON lines (default: text)"),
    opt("--log-level", default="info", choices=("debug", "info", "warning", "error"),
        help="least severe log lines to write (default: info)"),
)
CHECK = (opt("--no-check", dest="check", action="store_false",
             help="do not open one session at start to check the device and service (by default "
                  "a refusal exits 1 with the reason before anything listens); for a service that "
                  "must not see an extra connection"),)
LOCAL = (opt("--local", default="127.0.0.1:0", metavar="HOST:PORT",
             help="local listen address (default: 127.0.0.1 and a free port)"),)
DEVICE = opt("device", help="device id")
IDENTITY_HOME = "(default: $FLEET_IDENTITY, else ~/.config/fleet-tunnel)"


def _audit_commands(sub: argparse._SubParsersAction) -> None:
    """``tunnel audit``: ops commands over the registry, in the CLI layer. Registering them needs
    only the core; their SQLite code (the [server] extra) loads when one runs, and says what to
    install where it is missing. ``tunnel agent`` never registers them (see ``build_parser``)."""
    from tunnel import audit_cmd

    audit_cmd.register(sub)


def _helper(name: str):
    """A ``tunnel helper`` handler from ``tunnel/helper_cmd.py``, loaded when it runs."""

    def run(args) -> int:
        from tunnel import helper_cmd

        return getattr(helper_cmd, name)(args)

    return run


def cmd_completion(args) -> int:
    return clitools.print_completion(TUNNEL, args.shell)


def _argv_secret(**kwargs) -> argparse.Action:
    """``enroll.secret_input.ArgvSecretAction``, imported when a parser with ``login`` is built
    (getpass, shlex and termios are no part of ``tunnel agent``)."""
    from enroll.secret_input import ArgvSecretAction

    return ArgvSecretAction(**kwargs)


TUNNEL = Program("tunnel", __doc__, epilog=EPILOG, commands=(
    Command("proxy", "run the proxy: agents and engineers on one port (UDP and TCP)", cmd_proxy, (
        *STATE,
        opt("--listen", default="0.0.0.0:443", metavar="HOST:PORT",
            help="address for QUIC (UDP) and the TLS-over-TCP fallback (default: 0.0.0.0:443)"),
        opt("--idle-timeout", type=float, default=60.0, metavar="SECONDS",
            help="drop a silent connection after this long; keep it above the agents' "
                 "keepalive (default: 60, for the default 25 s keepalive)"),
        opt("--anonymous-rate", type=float, default=20.0, metavar="PER_SECOND",
            help="enrollments and logins accepted per second from all addresses together "
                 "(bursts of twice that); each address is also limited to 5/s (default: 20)"),
        opt("--anchor-dir", metavar="DIR",
            help="append the audit log's head (SEQ:HASH) to DIR/audit-anchors.jsonl "
                 "every --anchor-every and at shutdown; put DIR where it leaves this host "
                 "or cannot be rewritten (see 'tunnel audit verify --anchor')"),
        opt("--anchor-every", default="5m", metavar="DURATION",
            help="how often to write an anchor when the log has grown (default: 5m)"),
        opt("--metrics-listen", metavar="[HOST:]PORT",
            help="serve Prometheus /metrics and /healthz over HTTP, unauthenticated (default: "
                 "off); a bare PORT binds 127.0.0.1, anything wider must be named (0.0.0.0:9100)"),
        opt("--resume-hold", default="10m", metavar="DURATION",
            help="the longest a session's tunnel may be away and still resume (an engineer's "
                 "or agent's own hold may be shorter); 0 turns resuming off (default: 10m)"),
        *LOGGING,
    )),
    Command("agent", "run the agent on a device (dials out; listens on nothing)", cmd_agent, (
        opt("--config", required=True, metavar="FILE", help="agent.yaml written by 'enroll device'"),
        *LOGGING,
    ), description="run the agent on a device (dials out; listens on nothing); exits 5 when the "
                   "proxy refuses the device for good (decommissioned, revoked, unknown): "
                   "re-enroll it rather than restart it"),
    Command("proxy-command", "splice stdin/stdout to a device service (OpenSSH ProxyCommand)",
            cmd_proxy_command, (
        opt("device", help="device id (ssh's %%h)"),
        opt("target", nargs="?", default="ssh", help="service name or port; 22 means ssh (default: ssh)"),
        opt("--login", help="the login ssh will use (ssh's %%r): a login no role allows is refused at the dial"),
        *ENGINEER,
    )),
    Command("forward", "listen locally; each connection becomes a session to a device service",
            cmd_forward, (
        DEVICE,
        opt("service", help="service name as listed in the agent config (e.g. postgres, kube)"),
        *LOCAL, *CHECK, *ENGINEER,
    )),
    Command("ls", "list the devices you may reach, with labels and online state", cmd_ls, (
        opt("selector", nargs="*", metavar="ID|SELECTOR",
            help="device ids, or label selectors (key=value, key!=value, 'key in (a,b)', "
                 "key, !key; ANDed)"),
        *FORMAT, *ENGINEER,
    )),
    Extension(_audit_commands),
    Command("login", "log in to the proxy: a short-lived certificate for a key made here", cmd_login, (
        opt("--proxy", required=True, default_env="FLEET_PROXY", metavar="HOST:PORT",
            help="the proxy to log in to (default: $FLEET_PROXY)"),
        opt("--user", required=True, help="your user name, as 'enroll user add' made it"),
        opt("--invite-file", metavar="FILE",
            help="first login: read the one-time invite from FILE (- or --invite alone: stdin, "
                 "or a prompt on a terminal); default: $FLEET_INVITE"),
        opt("--invite", dest="invite_argv", action=_argv_secret, env="FLEET_INVITE",
            file_flag="--invite-file", what="invite", help=argparse.SUPPRESS),
        opt("--ca-pin", metavar="sha256:HEX", help="fleet CA pin (first login)"),
        opt("--totp-file", metavar="FILE",
            help="read the one-time code, if your account needs one, from FILE (- or --totp "
                 "alone: stdin, or a prompt on a terminal); default: $FLEET_TOTP"),
        opt("--totp", dest="totp_argv", action=_argv_secret, env="FLEET_TOTP",
            file_flag="--totp-file", what="one-time code", help=argparse.SUPPRESS),
        opt("--ttl", help="ask for a shorter certificate (roles cap it with max_session_ttl)"),
        opt("--password-stdin", action="store_true",
            help="read the password from stdin (default: ask on the terminal)"),
        opt("--server-name", help="name in the proxy certificate (default: the --proxy host)"),
        opt("--identity", metavar="DIR", help=f"where to store the identity {IDENTITY_HOME}"),
        *FORMAT,
    )),
    Command("logout", "remove your certificate and SSH certificates", cmd_logout, (
        opt("--identity", metavar="DIR", help=f"identity directory {IDENTITY_HOME}"),
        *FORMAT,
    )),
    Command("whoami", "your roles, certificate expiry and what you can reach", cmd_whoami,
            (*FORMAT, *ENGINEER)),
    Command("ssh-cert", "fetch the SSH certificate for LOGIN on DEVICE (used by ssh_config)",
            cmd_ssh_cert, (
        DEVICE,
        opt("login", help="login name on the device"),
        opt("--print-path", action="store_true", help="print the certificate's path"),
        *FORMAT, *ENGINEER,
    )),
    Command("config", "print an ssh_config block for 'ssh LOGIN@DEVICE.fleet'", cmd_config, (
        opt("--hosts", default="*.fleet", help="Host pattern (default: *.fleet; '*' for use with -F)"),
        opt("--write", action="store_true", help="write it into the identity directory instead"),
        *FORMAT, *ENGINEER,
    )),
    Command("ssh", "OpenSSH to LOGIN@DEVICE through the tunnel, with a per-session certificate",
            cmd_ssh, (
        opt("target", metavar="LOGIN@DEVICE", help="login name and device id"),
        opt("command", nargs=argparse.REMAINDER, help="command to run on the device"),
        opt("-o", dest="ssh_option", action="append", default=[], type=_ssh_option,
            help="extra ssh option (repeatable)"),
        *ENGINEER,
    )),
    Command("kube", "forward to a device's Kubernetes API and add a kubeconfig context", cmd_kube, (
        DEVICE,
        opt("--service", default="kube", help="the device's Kubernetes API service (default: kube)"),
        *LOCAL,
        opt("--kubeconfig", help="file to update (default: ~/.kube/config)"),
        opt("--certificate-authority", metavar="FILE",
            help="the device cluster's CA certificate, so kubectl verifies TLS"),
        opt("--tls-server-name", help="name in the API server certificate (e.g. kubernetes)"),
        opt("--client-certificate", metavar="FILE",
            help="your client certificate for the device's cluster (with --client-key)"),
        opt("--client-key", metavar="FILE", help="the key of --client-certificate"),
        opt("--token-file", metavar="FILE",
            help="a file holding your bearer token for the device's cluster (instead of a certificate)"),
        *CHECK, *ENGINEER,
    )),
    Command("db", "forward to a device's database and print the connection string", cmd_db, (
        DEVICE,
        opt("--service", default="postgres", help="the device's database service (default: postgres)"),
        *LOCAL,
        opt("--db-user", help="user name to put in the connection string"),
        opt("--database", help="database name to put in the connection string"),
        *CHECK, *ENGINEER,
    )),
    Command("status", "connected agents: address, transport, sessions, bytes, migrations", cmd_status, (
        opt("device", nargs="?", help="only this device"),
        *FORMAT, *ENGINEER,
    )),
    Command("helper", "the per-user helper that keeps a warm connection to the proxy for ssh",
            subcommands=(
        Command("status", "show the helper of this identity (pid, socket, connection)",
                _helper("cmd_status"), (*FORMAT, *ENGINEER)),
        Command("stop", "stop the helper of this identity (open sessions through it are cut)",
                _helper("cmd_stop"), (*FORMAT, *ENGINEER)),
        Command("run", "run the helper in the foreground (what ssh's ProxyCommand starts)",
                _helper("cmd_run"), (
            opt("--idle", default="30m", metavar="DURATION",
                help="exit after this long without sessions or requests; 0 or never: stay "
                     "(default: 30m)"),
            *ENGINEER, *LOGGING,
        )),
    )),
    clitools.completion_command(cmd_completion, "tunnel"),
))


def build_parser(*, agent_only: bool = False) -> argparse.ArgumentParser:
    """The parser of ``TUNNEL``. ``agent_only`` (``tunnel agent``) builds the ``agent`` command
    alone: a device has not installed the ops commands' registry code (sqlite-utils alone was
    4.5 MiB of an idle agent), and the engineer commands' parsers were 0.15 MiB of it more."""
    if agent_only:
        agent = dataclasses.replace(TUNNEL, commands=tuple(
            c for c in TUNNEL.commands if isinstance(c, Command) and c.name == "agent"))
        return agent.parser(extensions=False)
    return TUNNEL.parser()


def main(argv: list[str] | None = None) -> int:
    """Run one command; its errors become one line on stderr and an exit status.

    The status comes from the error's type: ``FleetError.exit_status`` (a ``ClientError``'s
    follows its code: unreachable 3, cut 4, else 1), never from message text. Naming the
    root here loads nothing: ``tunnel agent`` never imports the engineer client.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(agent_only=argv[:1] == ["agent"]).parse_args(argv)
    try:
        return args.func(args)
    except TransportError as exc:  # the connection ended under a command, outside the client
        print(f"tunnel: error: the connection to the proxy ended: {exc.reason or exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except FleetError as exc:
        print(f"tunnel: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except ValueError as exc:  # a standard parser (a duration, a number) with no type of ours
        print(f"tunnel: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
