"""``enroll``: create the fleet's identity, issue join tokens, enroll and manage devices."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Only what `enroll device` needs is imported here: a device has no sqlite-utils. Commands for
# the CA host import the registry-backed modules when they run.
from enroll import certs, clitools, device, output
from enroll.errors import RegistryError
from enroll.labels import parse_assignments, parse_selector
from enroll.request import parse_request, read_bundle_file
from enroll.secret_input import ArgvSecretAction, env_command, read_secret
from enroll.state import FleetState, StateError, default_state_dir, parse_duration

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

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


class Refused(Exception):
    """A user-facing refusal: printed as one line, exit status 1."""


def _actor(args) -> str:
    """Who did it, for the audit log: the operator's login on the CA host."""
    import getpass

    return args.creator if getattr(args, "creator", None) else f"admin:{getpass.getuser()}"


def _state(args) -> FleetState:
    return FleetState(Path(args.state) if args.state else default_state_dir())


def _format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=output.FORMATS, default="table",
                   help="output format: table for people, json or yaml for scripts (default: table)")


def _done(args, info: dict, text: str) -> None:
    """Report what a command did: ``text`` for people, ``info`` with --format json/yaml."""
    if args.format != "table":
        output.emit(info, args.format)
    else:
        print(text)


# --- commands -------------------------------------------------------------------------------


def cmd_init(args) -> int:
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
    if args.name_prefix and not certs.NAME_RE.match(args.name_prefix + "x"):
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

        print(f"enrolling through {args.proxy} ...", file=sys.stderr)
        summary = online.run(
            directory, args.proxy, token, args.ca_pin, name=args.name,
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
    return clitools.print_completion(build_parser(), args.shell)


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", default=argparse.SUPPRESS, metavar="DIR",
                        help="fleet state directory (default: $FLEET_STATE or the XDG data dir)")
    parser = argparse.ArgumentParser(
        prog="enroll", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common],
    )
    parser.add_argument("--version", action=clitools.VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text, **kw):
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        p.set_defaults(func=func)
        return p

    p = add("init", cmd_init, "create the fleet CA, SSH CAs, proxy certificate and registry (once)")
    p.add_argument("--fleet", required=True, help="fleet name (lowercase letters, digits, '-')")
    p.add_argument("--proxy-name", required=True, metavar="HOST", help="DNS name devices dial")
    p.add_argument("--proxy-ip", action="append", default=[], metavar="IP",
                   help="an IP address of the proxy to put in its certificate (repeatable)")
    p.add_argument("--proxy-port", type=int, default=443, help="proxy UDP port (default: 443)")
    p.add_argument("--device-lifetime", default="30d", help="device certificate lifetime (default: 30d)")
    _format_arg(p)

    token = add("token", None, "create, list and revoke join tokens")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    def tadd(name, func, help_text):
        p = tsub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    p = tadd("create", cmd_token_create, "create a join token; prints the secret once")
    p.add_argument("--label", action="append", default=[], metavar="K=V",
                   help="label every device enrolled with this token gets (repeatable)")
    p.add_argument("--ttl", default="30m", help="how long the token is valid (default: 30m)")
    p.add_argument("--uses", type=int, default=1, help="how many devices may use it (default: 1)")
    p.add_argument("--name-prefix", default="", metavar="PREFIX",
                   help="device ids become PREFIX + random, unless the device asks for --name")
    p.add_argument("--creator", help=argparse.SUPPRESS)
    _format_arg(p)
    p = tadd("ls", cmd_token_ls, "list tokens (never their secrets)")
    _format_arg(p)
    p = tadd("revoke", cmd_token_revoke, "revoke a token by id")
    p.add_argument("id", help="token id, as 'enroll token ls' shows it")
    _format_arg(p)

    p = add("device", cmd_device, "on the device: make keys locally and enroll (online or offline)")
    p.add_argument("--dir", required=True, help="identity directory on the device (made 0700)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--proxy", metavar="HOST:PORT",
                      help="enroll online through the proxy (checks it against --ca-pin first); "
                           "default: $FLEET_PROXY when neither --csr-only nor --install is given")
    mode.add_argument("--csr-only", action="store_true",
                      help="write DIR/request.json for the offline 'enroll sign'")
    mode.add_argument("--install", metavar="BUNDLE", help="install a bundle from 'enroll sign'")
    p.add_argument("--ca-pin", metavar="sha256:HEX", help="the fleet CA pin printed by 'enroll init'")
    p.add_argument("--token-file", metavar="FILE",
                   help="read the join token from FILE (- or --token alone: stdin, or a prompt on a terminal); "
                        "default: $FLEET_TOKEN, else a prompt on a terminal")
    p.add_argument("--token", dest="token_argv", action=ArgvSecretAction, env="FLEET_TOKEN",
                   file_flag="--token-file", what="join token", help=argparse.SUPPRESS)
    p.add_argument("--server-name", help="name in the proxy certificate (default: the --proxy host)")
    p.add_argument("--name", help="ask for this device id (default: token prefix + random)")
    p.add_argument("--ssh-host-key", metavar="PUB",
                   help="existing sshd host public key to certify (default: make one in DIR)")
    p.add_argument("--service", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="service the agent exposes (default: ssh=127.0.0.1:22; repeatable)")
    _format_arg(p)

    p = add("sign", cmd_sign, "on the CA host: sign an offline request with a token")
    p.add_argument("--csr", required=True, metavar="FILE", help="request.json from 'enroll device --csr-only'")
    p.add_argument("--token-file", metavar="FILE",
                   help="read the join token from FILE (- or --token alone: stdin, or a prompt on a terminal); "
                        "default: $FLEET_TOKEN, else a prompt on a terminal")
    p.add_argument("--token", dest="token_argv", action=ArgvSecretAction, env="FLEET_TOKEN",
                   file_flag="--token-file", what="join token", help=argparse.SUPPRESS)
    p.add_argument("--out", metavar="FILE", help="write the bundle here (default: stdout)")

    user = add("user", None, "engineer and ops identities")
    usub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    def uadd(name, func, help_text):
        p = usub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    p = uadd("add", cmd_user_add, "add an engineer; prints a one-time invite for 'tunnel login'")
    p.add_argument("name", help="user name (what they give to 'tunnel login --user')")
    p.add_argument("--role", action="append", default=[], help="role to hold (repeatable)")
    p.add_argument("--totp", action="store_true", help="also require a TOTP one-time code at login")
    _format_arg(p)
    p = uadd("ls", cmd_user_ls, "list engineers")
    _format_arg(p)
    p = uadd("lock", cmd_user_lock, "lock an engineer out; cuts their open sessions")
    p.add_argument("name", help="user name")
    p.add_argument("--ttl", help="lock only for this long (e.g. 1h)")
    p.add_argument("--message", default="", help="reason, for the audit log")
    _format_arg(p)
    p = uadd("unlock", cmd_user_unlock, "lift a user lock (and reset failed logins)")
    p.add_argument("name", help="user name")
    _format_arg(p)
    p = uadd("invite", cmd_user_invite, "a new one-time invite (forgotten password)")
    p.add_argument("name", help="user name")
    _format_arg(p)
    p = uadd("roles", cmd_user_roles, "replace the roles a user holds (acts at once)")
    p.add_argument("name", help="user name")
    p.add_argument("--role", action="append", default=[],
                   help="role to hold (repeatable); none given: the user holds no roles")
    _format_arg(p)

    p = usub.add_parser("issue", parents=[common],
                        help="issue a short-lived user certificate into DIR (key made here)",
                        description="issue a short-lived user certificate into DIR (key made here)")
    p.set_defaults(func=cmd_user_issue)
    p.add_argument("name", help="user name the certificate is for")
    p.add_argument("--role", action="append", default=[], help="role to hold (repeatable), e.g. admin")
    p.add_argument("--dir", required=True, help="identity directory to write (made 0700)")
    p.add_argument("--ttl", default="8h", help="certificate lifetime (default: 8h)")
    p.add_argument("--proxy", metavar="HOST:PORT",
                   help="proxy address for client.yaml (default: $FLEET_PROXY, else from fleet.yaml)")
    _format_arg(p)

    cert = add("cert", None, "list and revoke issued certificates")
    csub = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")
    p = csub.add_parser("ls", parents=[common], help="list certificates (unexpired unless --all)",
                        description="list certificates (unexpired unless --all), newest first")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="NAME", help="only this user's certificates")
    who.add_argument("--device", metavar="ID", help="only this device's certificates")
    p.add_argument("--all", action="store_true", help="include expired certificates")
    _format_arg(p)
    p.set_defaults(func=cmd_cert_ls)
    p = csub.add_parser("revoke", parents=[common], help="revoke a certificate by serial, or all of a user's",
                        description="revoke a certificate by serial, or every valid one of a user "
                                    "(--user); the proxy refuses it from the next connection")
    p.add_argument("serial", nargs="?", metavar="SERIAL", help="hex serial, as 'enroll cert ls' shows it")
    p.add_argument("--user", metavar="NAME", help="revoke every valid certificate of this user")
    p.add_argument("--message", default="", help="why, for the audit log")
    _format_arg(p)
    p.set_defaults(func=cmd_cert_revoke)

    role = add("role", None, "label-based roles (Teleport-style YAML)")
    rsub = role.add_subparsers(dest="role_command", required=True, metavar="ACTION")
    p = rsub.add_parser("apply", parents=[common], help="create or replace roles from a YAML file",
                        description="create or replace roles from a YAML file (several documents allowed)")
    p.add_argument("-f", "--file", required=True, help="role YAML file, or - for stdin")
    _format_arg(p)
    p.set_defaults(func=cmd_role_apply)
    p = rsub.add_parser("ls", parents=[common], help="list roles")
    _format_arg(p)
    p.set_defaults(func=cmd_role_ls)
    p = rsub.add_parser("rm", parents=[common], help="remove a role (its holders lose it at once)")
    p.add_argument("name", help="role name")
    _format_arg(p)
    p.set_defaults(func=cmd_role_rm)

    p = add("devices", cmd_devices, "list enrolled devices, optionally by id or label selector")
    p.add_argument("selector", nargs="*", metavar="ID|SELECTOR",
                   help="device ids, or label selectors (key=value, key!=value, 'key in (a,b)', "
                        "key, !key; ANDed)")
    _format_arg(p)

    p = add("relabel", cmd_relabel, "set or remove labels of a device (acts at once)")
    p.add_argument("device", help="device id")
    p.add_argument("labels", nargs="*", metavar="K=V", help="labels to set")
    p.add_argument("--remove", action="append", default=[], metavar="KEY",
                   help="label to remove (repeatable)")
    _format_arg(p)

    p = add("decommission", cmd_decommission, "retire a device: lifecycle decommissioned, certificate revoked")
    p.add_argument("device", help="device id")
    _format_arg(p)

    p = add("lock", cmd_lock, "block a device's connections and sessions until unlocked")
    p.add_argument("device", help="device id")
    p.add_argument("--ttl", help="lock only for this long (e.g. 1h); default: until unlocked")
    p.add_argument("--message", default="", help="reason shown to engineers and in the audit log")
    _format_arg(p)

    p = add("unlock", cmd_unlock, "lift a device lock")
    p.add_argument("device", help="device id")
    _format_arg(p)

    p = add("backup", cmd_backup, "copy the registry while the proxy runs (SQLite online backup), "
            "then verify the copy's audit chain")
    p.add_argument("dest", metavar="DEST", help="new file to write (0600; never overwritten)")
    _format_arg(p)

    p = add("completion", cmd_completion, "print a shell completion script (bash, zsh or fish)")
    p.description += ("; load it with 'source <(enroll completion bash)' (zsh: the same with zsh), "
                      "or 'enroll completion fish | source'")
    p.add_argument("shell", choices=clitools.SHELLS, help="the shell to complete in")
    return parser


# Every user-facing error is one of these (labels, certificates, tokens, roles, users, admin
# actions and enrollment raise ValueError subclasses).
USER_ERRORS = (Refused, StateError, RegistryError, ValueError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.state = getattr(args, "state", None)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"enroll: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except FileNotFoundError as exc:
        print(f"enroll: error: no such file: {exc.filename}", file=sys.stderr)
        return EXIT_REFUSED
    except PermissionError as exc:
        print(f"enroll: error: permission denied: {exc.filename}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
