"""``enroll``: create the fleet's identity, issue join tokens, enroll and manage devices."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Only what `enroll device` needs is imported here: a device has no sqlite-utils. Commands for
# the CA host import the registry-backed modules when they run.
from enroll import certs, clitools, device, names, output
from enroll.clitools import FORMAT, STATE, Command, Program, Refused, one_of, opt
from enroll.durations import parse_duration
from enroll.errors import EXIT_OK, EXIT_REFUSED, FleetError
from enroll.labels import parse_assignments, parse_selector
from enroll.request import parse_request, read_bundle_file
from enroll.secret_input import ArgvSecretAction, env_command, read_secret

EPILOG = """\
exit status:
  0  success
  1  refused or failed: the message on stderr says what was wrong and what to do;
     nothing was changed
  2  usage error (unknown option, missing argument)

The state directory (CA keys, registry) is --state, else $FLEET_STATE, else
$XDG_DATA_HOME/fleet-tunnel. A proxy address not given with --proxy is
$FLEET_PROXY. Labels are key=value; selectors are key=value,
key!=value, 'key in (a,b)', 'key notin (a,b)', key, !key — several are ANDed.
"""

DEVICE_COLUMNS = ["id", "lifecycle", "labels", "last_seen", "locked_until"]
TOKEN_COLUMNS = ["id", "status", "labels", "uses_left", "expires_at", "name_prefix"]


def _actor(args) -> str:
    """Who did it, for the audit log: the operator's login on the CA host."""
    import getpass

    return args.creator if getattr(args, "creator", None) else f"admin:{getpass.getuser()}"


def _state(args):
    from enroll.state import FleetState, default_state_dir  # CA host only: not `enroll device`

    return FleetState(Path(args.state) if args.state else default_state_dir())


def _done(args, info: dict, text: str) -> None:
    """Report what a command did: ``text`` for people, ``info`` with --format json/yaml."""
    if args.format != "table":
        output.emit(info, args.format)
    else:
        print(text)


# --- commands -------------------------------------------------------------------------------


def cmd_init(args) -> int:
    from enroll.state import FleetState, default_state_dir

    root = Path(args.state) if args.state else default_state_dir()
    state = FleetState.create(
        root,
        fleet=args.fleet,
        proxy_name=args.proxy_name,
        proxy_ips=args.proxy_ip,
        proxy_port=args.proxy_port,
        device_lifetime=args.device_lifetime,
    )
    info = {
        "fleet": state.fleet,
        "state": str(root),
        "ca_pin": certs.ca_pin(state.ca_cert),
        "proxy": state.proxy_address,
        "ssh_host_ca": state.ssh_ca_public("host"),
    }
    if args.format != "table":
        output.emit(info, args.format)
    else:
        print(f"Created fleet {info['fleet']!r} in {root}")
        print(f"CA pin (give this to every enrollment line): {info['ca_pin']}")
        print(f"Proxy endpoint: {info['proxy']}")
    return EXIT_OK


def cmd_token_create(args) -> int:
    from enroll import tokens

    state = _state(args)
    labels = parse_assignments(args.label)
    if args.name_prefix and not names.is_name(args.name_prefix + "x"):
        raise Refused(f"bad --name-prefix {args.name_prefix!r}: use lowercase letters, digits and '-'")
    with state.registry() as reg:
        secret, row = tokens.create(
            reg, state.fleet, labels=labels, ttl=parse_duration(args.ttl), uses=args.uses,
            name_prefix=args.name_prefix, creator=_actor(args),
        )
    if args.format != "table":
        output.emit({"token": secret, "id": row["id"], "expires_at": row["expires_at"],
                     "uses": row["uses_total"], "labels": json.loads(row["labels"])}, args.format)
    else:
        print(secret)
        print(f"token {row['id']}: {row['uses_total']} use(s), expires {row['expires_at']}; "
              "shown once, only its hash is stored", file=sys.stderr)
    return EXIT_OK


def cmd_token_ls(args) -> int:
    from enroll import tokens

    state = _state(args)
    with state.registry() as reg:
        output.emit(tokens.listing(reg), args.format, TOKEN_COLUMNS)
    return EXIT_OK


def cmd_token_revoke(args) -> int:
    from enroll import tokens

    state = _state(args)
    with state.registry() as reg:
        tokens.revoke(reg, args.id, actor=_actor(args))
    _done(args, {"token": args.id, "status": "revoked"}, f"token {args.id} revoked")
    return EXIT_OK


def _services(entries: list[str] | None) -> dict[str, str] | None:
    """``--service NAME=HOST:PORT`` entries, checked before anything is written or a token spent."""
    if not entries:
        return None
    from enroll.labels import MAX_SERVICES, SERVICE_NAME_RULE, valid_service_name

    services = {}
    for entry in entries:
        name, sep, address = entry.partition("=")
        host, colon, port = address.rpartition(":")
        if not sep or not colon or not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise Refused(f"--service {entry!r}: expected NAME=HOST:PORT, e.g. ssh=127.0.0.1:22")
        if not valid_service_name(name):
            raise Refused(f"--service {entry!r}: a service name is {SERVICE_NAME_RULE}")
        services[name] = address
    if len(services) > MAX_SERVICES:
        raise Refused(f"{len(services)} services given; at most {MAX_SERVICES}")
    return services


def cmd_device(args) -> int:
    directory = Path(args.dir)
    services = _services(args.service)
    if args.install:
        if not args.ca_pin:
            raise Refused("--install needs --ca-pin sha256:... (from 'enroll init') to check the bundle")
        bundle = read_bundle_file(args.install)  # size-capped before parsing
        summary = device.install(directory, bundle, args.ca_pin, services)
        output.emit(summary, args.format)
        return EXIT_OK
    if args.csr_only:
        device.prepare(directory, args.name, Path(args.ssh_host_key) if args.ssh_host_key else None)
        print(f"wrote {directory / 'request.json'}: take it to the CA host and run "
              f"'enroll sign --csr request.json --token-file TOKEN_FILE --out bundle.json'", file=sys.stderr)
        return EXIT_OK
    if not args.proxy and not args.install and not args.csr_only:
        args.proxy = os.environ.get("FLEET_PROXY") or None
    if args.proxy:
        if not args.ca_pin:
            raise Refused("online enrollment needs --ca-pin along with --proxy")
        token = read_secret("join token", file=args.token_file, env="FLEET_TOKEN", prompt=True)
        if not token:
            raise Refused("online enrollment needs the join token: pass it in $FLEET_TOKEN or with "
                          "--token-file FILE (- reads stdin)")
        from enroll import online

        if args.exchange is None:  # enroll knows no transport: the `enroll` command injects one
            raise Refused("online enrollment needs the tunnel transport: run the installed 'enroll' "
                          "command (python -m tunnel.enroll_cli), not python -m enroll.cli")
        print(f"enrolling through {args.proxy} ...", file=sys.stderr)
        summary = online.run(
            directory, args.proxy, token, args.ca_pin, exchange=args.exchange, name=args.name,
            server_name=args.server_name, services=services,
            ssh_host_key=Path(args.ssh_host_key) if args.ssh_host_key else None,
        )
        output.emit(summary, args.format)
        return EXIT_OK
    raise Refused(
        "choose how to enroll: --proxy HOST:PORT (or $FLEET_PROXY) --ca-pin PIN with the token in $FLEET_TOKEN (online), "
        "--csr-only (write a request for 'enroll sign'), or --install BUNDLE --ca-pin PIN"
    )


def cmd_sign(args) -> int:
    from enroll.enrollment import enroll

    state = _state(args)
    request = parse_request(Path(args.csr).read_bytes())
    token = read_secret("join token", file=args.token_file, env="FLEET_TOKEN", prompt=True)
    if not token:
        raise Refused("enroll sign needs the join token: pass it in $FLEET_TOKEN or with "
                      "--token-file FILE (- reads stdin)")
    with state.registry() as reg:
        bundle = enroll(state, reg, request, token)
    text = json.dumps(bundle, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"enrolled {bundle['device_id']}; bundle written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_user_issue(args) -> int:
    """Issue a user certificate on the CA host, for an ops identity used right here."""
    from enroll import users
    from enroll.enrollment import issue_user
    from enroll.files import make_private_dir, write_file, write_private

    state = _state(args)
    ttl = parse_duration(args.ttl)
    directory = make_private_dir(Path(args.dir))
    key = certs.new_key()
    with state.registry() as reg:
        # a user record (no password) so 'enroll user lock NAME' works for this identity too
        roles = users.ensure_identity(reg, args.name, args.role, actor=_actor(args))
        cert = issue_user(state, reg, args.name, key.public_key(), roles, ttl, actor=_actor(args))
    write_private(directory / "user.key", certs.key_pem(key))
    write_file(directory / "user.crt", certs.cert_pem(cert))
    write_file(directory / "ca.crt", certs.cert_pem(state.ca_cert))
    write_file(directory / "known_hosts", f"@cert-authority * {state.ssh_ca_public('host')}\n")
    proxy = args.proxy or os.environ.get("FLEET_PROXY") or state.proxy_address
    write_file(directory / "client.yaml",
               f"proxy: {proxy}\nserver_name: {state.config['proxy_name']}\n")
    expires = f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    if args.format != "table":
        output.emit({"user": args.name, "roles": roles, "expires": expires, "dir": str(directory),
                     "proxy": proxy, "serial": format(cert.serial_number, "x")}, args.format)
    else:
        print(f"user certificate for {args.name} (roles: {', '.join(roles) or 'none'}) "
              f"valid until {expires}, in {directory}", file=sys.stderr)
    return EXIT_OK


def cmd_role_apply(args) -> int:
    from enroll import users

    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    state = _state(args)
    with state.registry() as reg:
        names = users.apply_roles(reg, text, actor=_actor(args))
    _done(args, {"applied": names}, f"applied role(s): {', '.join(names)}")
    return EXIT_OK


def cmd_role_ls(args) -> int:
    from enroll import users

    with _state(args).registry() as reg:
        rows = users.list_roles(reg)
    output.emit(rows, args.format, ["name", "allow", "deny", "updated_at"])
    return EXIT_OK


def cmd_role_rm(args) -> int:
    from enroll import users

    with _state(args).registry() as reg:
        users.remove_role(reg, args.name, actor=_actor(args))
    _done(args, {"role": args.name, "status": "removed"}, f"role {args.name} removed")
    return EXIT_OK


def _login_command(proxy: str, user: str, pin: str, invite: str) -> str:
    """The first-login command for an invite: the invite travels in $FLEET_INVITE (never on the
    login process's command line), shell-quoted so an invite starting with '-' works too."""
    return env_command("FLEET_INVITE", invite,
                       ["tunnel", "login", "--proxy", proxy, "--user", user, "--ca-pin", pin])


def cmd_user_add(args) -> int:
    from enroll import users

    state = _state(args)
    with state.registry() as reg:
        invite, totp_secret = users.add(reg, args.name, args.role, with_totp=args.totp, actor=_actor(args))
    info = {"user": args.name, "invite": invite, "ca_pin": certs.ca_pin(state.ca_cert),
            "proxy": state.proxy_address, "expires_in": "24h"}
    if totp_secret:
        info["totp_uri"] = f"otpauth://totp/{state.fleet}:{args.name}?secret={totp_secret}&issuer={state.fleet}"
    if args.format != "table":
        output.emit(info, args.format)
    else:
        print(f"user {args.name} added; give them this one-time invite (valid 24h, shown once):")
        print(f"  {_login_command(info['proxy'], args.name, info['ca_pin'], invite)}")
        if totp_secret:
            print(f"TOTP (add to an authenticator app): {info['totp_uri']}")
    return EXIT_OK


def cmd_user_ls(args) -> int:
    from enroll import users

    with _state(args).registry() as reg:
        rows = users.listing(reg)
    output.emit(rows, args.format, ["name", "roles", "status", "totp", "failed_logins"])
    return EXIT_OK


def cmd_user_lock(args) -> int:
    from enroll import users

    with _state(args).registry() as reg:
        users.lock(reg, args.name, parse_duration(args.ttl) if args.ttl else None, args.message,
                   actor=_actor(args))
    _done(args, {"user": args.name, "status": "locked", "ttl": args.ttl, "message": args.message},
          f"user {args.name} locked; open sessions are cut within a second")
    return EXIT_OK


def cmd_user_unlock(args) -> int:
    from enroll import users

    with _state(args).registry() as reg:
        users.unlock(reg, args.name, actor=_actor(args))
    _done(args, {"user": args.name, "status": "unlocked"}, f"user {args.name} unlocked")
    return EXIT_OK


def cmd_user_invite(args) -> int:
    from enroll import users

    state = _state(args)
    with state.registry() as reg:
        invite = users.new_invite(reg, args.name, actor=_actor(args))
    pin = certs.ca_pin(state.ca_cert)
    _done(args, {"user": args.name, "invite": invite, "ca_pin": pin, "proxy": state.proxy_address,
                 "expires_in": "24h"},
          _login_command(state.proxy_address, args.name, pin, invite))
    return EXIT_OK


def cmd_user_roles(args) -> int:
    from enroll import users

    with _state(args).registry() as reg:
        users.set_roles(reg, args.name, args.role, actor=_actor(args))
    _done(args, {"user": args.name, "roles": args.role},
          f"user {args.name} now holds: {', '.join(args.role) or 'no roles'} (acts at once)")
    return EXIT_OK


CERT_COLUMNS = ["serial", "kind", "subject", "status", "issued_at", "not_after", "revoked_reason"]


def cmd_cert_ls(args) -> int:
    from enroll import admin

    with _state(args).registry() as reg:
        rows = admin.list_certs(reg, user=args.user, device=args.device, include_expired=args.all)
    output.emit(rows, args.format, CERT_COLUMNS)
    return EXIT_OK


def cmd_cert_revoke(args) -> int:
    from enroll import admin

    if bool(args.serial) == bool(args.user):
        raise Refused("give either a SERIAL or --user NAME (see 'enroll cert ls')")
    with _state(args).registry() as reg:
        if args.serial:
            row = admin.revoke_cert(reg, args.serial, args.message, actor=_actor(args))
            serials = [row["serial"]]
            text = (f"certificate {row['serial']} ({row['kind']} {row['subject']}) revoked; "
                    "connections using it are refused")
        else:
            serials = admin.revoke_user_certs(reg, args.user, args.message, actor=_actor(args))
            text = (f"revoked {len(serials)} certificate(s) of user {args.user}: {', '.join(serials)}; "
                    f"to keep them from logging in again: 'enroll user lock {args.user}'")
    _done(args, {"revoked": serials}, text)
    return EXIT_OK


def cmd_devices(args) -> int:
    state = _state(args)
    parse_selector([a for a in args.selector if not clitools.is_bare(a)])  # syntax first
    with state.registry() as reg:
        all_devices = reg.devices()
    # a bare argument naming an enrolled device is that device; the rest is a label selector
    ids, terms = clitools.split_ids(args.selector, (d.id for d in all_devices))
    selector = parse_selector(terms)
    rows = [d.as_dict() for d in all_devices
            if (not ids or d.id in ids) and selector.matches(d.labels)]
    output.emit(rows, args.format, DEVICE_COLUMNS)
    if not rows and selector.terms and args.format == "table":
        known = sorted({k for d in all_devices for k in d.labels})
        print(f"no device matches {selector}; label keys in use: {', '.join(known) or 'none'}",
              file=sys.stderr)
    return EXIT_OK


def cmd_relabel(args) -> int:
    from enroll import admin

    state = _state(args)
    with state.registry() as reg:
        dev = admin.relabel(reg, args.device, parse_assignments(args.labels), args.remove,
                            actor=_actor(args))
    output.emit(dev.as_dict(), args.format)
    return EXIT_OK


def cmd_decommission(args) -> int:
    from enroll import admin

    state = _state(args)
    with state.registry() as reg:
        dev = admin.decommission(reg, args.device, actor=_actor(args))
    _done(args, dev.as_dict(), f"{dev.id} decommissioned; certificate {dev.cert_serial} revoked")
    return EXIT_OK


def cmd_lock(args) -> int:
    from enroll import admin

    state = _state(args)
    ttl = parse_duration(args.ttl) if args.ttl else None
    with state.registry() as reg:
        dev = admin.lock(reg, args.device, ttl, args.message, actor=_actor(args))
    _done(args, dev.as_dict(), f"{dev.id} locked until {dev.locked_until}")
    return EXIT_OK


def cmd_unlock(args) -> int:
    from enroll import admin

    state = _state(args)
    with state.registry() as reg:
        dev = admin.unlock(reg, args.device, actor=_actor(args))
    _done(args, dev.as_dict(), f"{dev.id} unlocked")
    return EXIT_OK


def cmd_backup(args) -> int:
    from enroll.backup import backup

    done = backup(_state(args), Path(args.dest))
    info = done.as_dict()
    if args.format != "table":
        output.emit(info, args.format)
    else:
        print(f"registry {info['source']} backed up to {info['backup']} ({info['bytes']} bytes, "
              f"schema {info['schema']})")
        print(f"audit chain of the copy: {info['chain']}; {info['events']} events; "
              f"anchor {info['anchor']} (keep it apart from the backup: 'tunnel audit verify --anchor')")
    if done.broken is not None:
        print(f"enroll: error: the copy's audit chain is broken at event {done.broken.seq} "
              f"({done.broken.problem}); so is the live registry's: the backup is kept as evidence",
              file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def cmd_completion(args) -> int:
    return clitools.print_completion(ENROLL, args.shell)


# --- the command table ----------------------------------------------------------------------

NAME = opt("name", help="user name")
DEVICE = opt("device", help="device id")
TOKEN_FILE = opt("--token-file", metavar="FILE",
                 help="read the join token from FILE (- or --token alone: stdin, or a prompt on a "
                      "terminal); default: $FLEET_TOKEN, else a prompt on a terminal")
TOKEN_ARGV = opt("--token", dest="token_argv", action=ArgvSecretAction, env="FLEET_TOKEN",
                 file_flag="--token-file", what="join token", help=argparse.SUPPRESS)
SELECTOR = opt("selector", nargs="*", metavar="ID|SELECTOR",
               help="device ids, or label selectors (key=value, key!=value, 'key in (a,b)', "
                    "key, !key; ANDed)")

ENROLL = Program("enroll", __doc__, epilog=EPILOG, inherit=STATE, commands=(
    Command("init", "create the fleet CA, SSH CAs, proxy certificate and registry (once)", cmd_init, (
        opt("--fleet", required=True, help="fleet name (lowercase letters, digits, '-')"),
        opt("--proxy-name", required=True, metavar="HOST", help="DNS name devices dial"),
        opt("--proxy-ip", action="append", default=[], metavar="IP",
            help="an IP address of the proxy to put in its certificate (repeatable)"),
        opt("--proxy-port", type=int, default=443, help="proxy port, UDP (QUIC) and TCP (TLS) (default: 443)"),
        opt("--device-lifetime", default="30d", help="device certificate lifetime (default: 30d)"),
        *FORMAT,
    )),
    Command("token", "create, list and revoke join tokens", subcommands=(
        Command("create", "create a join token; prints the secret once", cmd_token_create, (
            opt("--label", action="append", default=[], metavar="K=V",
                help="label every device enrolled with this token gets (repeatable)"),
            opt("--ttl", default="30m", help="how long the token is valid (default: 30m)"),
            opt("--uses", type=int, default=1, help="how many devices may use it (default: 1)"),
            opt("--name-prefix", default="", metavar="PREFIX",
                help="device ids become PREFIX + random, unless the device asks for --name"),
            opt("--creator", help=argparse.SUPPRESS),
            *FORMAT,
        )),
        Command("ls", "list tokens (never their secrets)", cmd_token_ls, FORMAT),
        Command("revoke", "revoke a token by id", cmd_token_revoke, (
            opt("id", help="token id, as 'enroll token ls' shows it"),
            *FORMAT,
        )),
    )),
    Command("device", "on the device: make keys locally and enroll (online or offline)", cmd_device, (
        opt("--dir", required=True, help="identity directory on the device (made 0700)"),
        one_of(
            opt("--proxy", metavar="HOST:PORT",
                help="enroll online through the proxy (checks it against --ca-pin first); "
                     "default: $FLEET_PROXY when neither --csr-only nor --install is given"),
            opt("--csr-only", action="store_true",
                help="write DIR/request.json for the offline 'enroll sign'"),
            opt("--install", metavar="BUNDLE", help="install a bundle from 'enroll sign'"),
        ),
        opt("--ca-pin", metavar="sha256:HEX", help="the fleet CA pin printed by 'enroll init'"),
        TOKEN_FILE, TOKEN_ARGV,
        opt("--server-name", help="name in the proxy certificate (default: the --proxy host)"),
        opt("--name", help="ask for this device id (default: token prefix + random)"),
        opt("--ssh-host-key", metavar="PUB",
            help="existing sshd host public key to certify (default: make one in DIR)"),
        opt("--service", action="append", default=[], metavar="NAME=HOST:PORT",
            help="service the agent exposes (default: ssh=127.0.0.1:22; repeatable)"),
        *FORMAT,
    )),
    Command("sign", "on the CA host: sign an offline request with a token", cmd_sign, (
        opt("--csr", required=True, metavar="FILE", help="request.json from 'enroll device --csr-only'"),
        TOKEN_FILE, TOKEN_ARGV,
        opt("--out", metavar="FILE", help="write the bundle here (default: stdout)"),
    )),
    Command("user", "engineer and ops identities", subcommands=(
        Command("add", "add an engineer; prints a one-time invite for 'tunnel login'", cmd_user_add, (
            opt("name", help="user name (what they give to 'tunnel login --user')"),
            opt("--role", action="append", default=[], help="role to hold (repeatable)"),
            opt("--totp", action="store_true", help="also require a TOTP one-time code at login"),
            *FORMAT,
        )),
        Command("ls", "list engineers", cmd_user_ls, FORMAT),
        Command("lock", "lock an engineer out; cuts their open sessions", cmd_user_lock, (
            NAME,
            opt("--ttl", help="lock only for this long (e.g. 1h)"),
            opt("--message", default="", help="reason, for the audit log"),
            *FORMAT,
        )),
        Command("unlock", "lift a user lock (and reset failed logins)", cmd_user_unlock, (NAME, *FORMAT)),
        Command("invite", "a new one-time invite (forgotten password)", cmd_user_invite, (NAME, *FORMAT)),
        Command("roles", "replace the roles a user holds (acts at once)", cmd_user_roles, (
            NAME,
            opt("--role", action="append", default=[],
                help="role to hold (repeatable); none given: the user holds no roles"),
            *FORMAT,
        )),
        Command("issue", "issue a short-lived user certificate into DIR (key made here)", cmd_user_issue, (
            opt("name", help="user name the certificate is for"),
            opt("--role", action="append", default=[], help="role to hold (repeatable), e.g. admin"),
            opt("--dir", required=True, help="identity directory to write (made 0700)"),
            opt("--ttl", default="8h", help="certificate lifetime (default: 8h)"),
            opt("--proxy", metavar="HOST:PORT",
                help="proxy address for client.yaml (default: $FLEET_PROXY, else from fleet.yaml)"),
            *FORMAT,
        )),
    )),
    Command("cert", "list and revoke issued certificates", subcommands=(
        Command("ls", "list certificates (unexpired unless --all)", cmd_cert_ls, (
            one_of(opt("--user", metavar="NAME", help="only this user's certificates"),
                   opt("--device", metavar="ID", help="only this device's certificates")),
            opt("--all", action="store_true", help="include expired certificates"),
            *FORMAT,
        ), description="list certificates (unexpired unless --all), newest first"),
        Command("revoke", "revoke a certificate by serial, or all of a user's", cmd_cert_revoke, (
            opt("serial", nargs="?", metavar="SERIAL", help="hex serial, as 'enroll cert ls' shows it"),
            opt("--user", metavar="NAME", help="revoke every valid certificate of this user"),
            opt("--message", default="", help="why, for the audit log"),
            *FORMAT,
        ), description="revoke a certificate by serial, or every valid one of a user (--user); "
                       "the proxy refuses it from the next connection"),
    )),
    Command("role", "label-based roles (Teleport-style YAML)", subcommands=(
        Command("apply", "create or replace roles from a YAML file", cmd_role_apply, (
            opt("-f", "--file", required=True, help="role YAML file, or - for stdin"),
            *FORMAT,
        ), description="create or replace roles from a YAML file (several documents allowed)"),
        Command("ls", "list roles", cmd_role_ls, FORMAT),
        Command("rm", "remove a role (its holders lose it at once)", cmd_role_rm, (
            opt("name", help="role name"),
            *FORMAT,
        )),
    )),
    Command("devices", "list enrolled devices, optionally by id or label selector", cmd_devices,
            (SELECTOR, *FORMAT)),
    Command("relabel", "set or remove labels of a device (acts at once)", cmd_relabel, (
        DEVICE,
        opt("labels", nargs="*", metavar="K=V", help="labels to set"),
        opt("--remove", action="append", default=[], metavar="KEY", help="label to remove (repeatable)"),
        *FORMAT,
    )),
    Command("decommission", "retire a device: lifecycle decommissioned, certificate revoked",
            cmd_decommission, (DEVICE, *FORMAT)),
    Command("lock", "block a device's connections and sessions until unlocked", cmd_lock, (
        DEVICE,
        opt("--ttl", help="lock only for this long (e.g. 1h); default: until unlocked"),
        opt("--message", default="", help="reason shown to engineers and in the audit log"),
        *FORMAT,
    )),
    Command("unlock", "lift a device lock", cmd_unlock, (DEVICE, *FORMAT)),
    Command("backup", "copy the registry while the proxy runs (SQLite online backup), then verify "
            "the copy's audit chain", cmd_backup, (
        opt("dest", metavar="DEST", help="new file to write (0600; never overwritten)"),
        *FORMAT,
    )),
    clitools.completion_command(cmd_completion, "enroll"),
))


def build_parser() -> argparse.ArgumentParser:
    return ENROLL.parser()


def main(argv: list[str] | None = None, *, exchange=None) -> int:
    """Run one command; its errors become one line on stderr and an exit status.

    The status comes from the error's type (``FleetError.exit_status``), never from its text.
    ``exchange``: how ``enroll device --proxy`` talks to the proxy (see :mod:`enroll.online`);
    the installed ``enroll`` command (``tunnel/enroll_cli.py``) injects the tunnel's.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.exchange = exchange
    try:
        return args.func(args)
    except FleetError as exc:
        print(f"enroll: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except ValueError as exc:  # a standard parser (a duration, a number) with no type of ours
        print(f"enroll: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except FileNotFoundError as exc:
        print(f"enroll: error: no such file: {exc.filename}", file=sys.stderr)
        return EXIT_REFUSED
    except PermissionError as exc:
        print(f"enroll: error: permission denied: {exc.filename}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
