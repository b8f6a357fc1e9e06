"""Engineer workflows on top of the client: login, SSH certificates, ssh_config, kube and db.

SSH without static keys: the engineer's SSH key is made locally (``ssh/id_ed25519``); for each
``LOGIN@DEVICE`` the proxy signs a five-minute certificate whose only principal is
``LOGIN@DEVICE`` — sshd on that device accepts it for that login only. ``tunnel config`` writes
an ssh_config whose ``Match exec`` line fetches that certificate before ssh loads it, so plain
``ssh``, ``scp`` and Ansible need nothing per device. Host keys are checked against the fleet's
host CA (one ``@cert-authority`` line), so there is no trust-on-first-use prompt.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import shlex
import shutil
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

from enroll import certs
from enroll.files import make_private_dir, write_file, write_private
from tunnel.client import (
    Client,
    ClientError,
    Refusal,
    UserIdentity,
    anonymous_request,
    device_from_host,
)

SUFFIX = ".fleet"
CERT_MIN_LEFT = dt.timedelta(seconds=60)
# ssh_config's Match exec skips starting Python while the cached certificate is this young
# (certificates last five minutes): Ansible runs ssh for every task.
FRESH_MINUTES = 3
strip_suffix = device_from_host


# --- login ------------------------------------------------------------------------------------


async def login(directory: Path, proxy: str, user: str, password: str, *, invite: str | None = None,
                totp: str | None = None, ca_pin: str | None = None, ttl: str | None = None,
                server_name: str | None = None) -> dict:
    """Authenticate to the proxy and store a fresh user certificate for a key made here."""
    directory = make_private_dir(directory)
    ca_path = directory / "ca.crt"
    ca = certs.load_cert(ca_path.read_bytes()) if ca_path.exists() else None
    if ca is None and not ca_pin:
        raise ClientError("first login: pass --ca-pin sha256:... (printed with your invite)")
    key = certs.new_key()
    args = {"user": user, "password": password, "csr": certs.csr_pem(key), "invite": invite, "totp": totp, "ttl": ttl}
    try:
        body = await anonymous_request(proxy, "login", args, ca=ca, ca_pin=ca_pin,
                                       server_name=server_name, timeout=30)
    except Refusal as exc:
        raise ClientError(f"login refused: {exc}", "login_failed") from None
    cert = certs.load_cert(body["cert"].encode())
    write_private(directory / "user.key", certs.key_pem(key))
    write_file(directory / "user.crt", body["cert"])
    write_file(ca_path, body["ca"])
    write_file(directory / "known_hosts", f"@cert-authority * {body['ssh_host_ca']}\n")
    write_file(directory / "client.yaml", f"proxy: {proxy}\nserver_name: {body['server_name']}\n")
    return {"user": user, "roles": body["roles"], "expires": cert.not_valid_after_utc.isoformat(),
            "identity": str(directory)}


def logout(directory: Path) -> list[str]:
    removed = []
    for name in ("user.crt", "user.key"):
        path = directory / name
        if path.exists():
            path.unlink()
            removed.append(name)
    ssh_dir = directory / "ssh"
    if ssh_dir.exists():
        for cert in ssh_dir.glob("*-cert.pub"):
            cert.unlink()
            removed.append(f"ssh/{cert.name}")
    return removed


# --- SSH certificates and config ------------------------------------------------------------


def ssh_key_path(identity: UserIdentity) -> Path:
    return identity.directory / "ssh" / "id_ed25519"


def ensure_ssh_key(identity: UserIdentity) -> Path:
    path = ssh_key_path(identity)
    if not path.exists():
        make_private_dir(path.parent)
        key = certs.new_ssh_ca_key()  # an Ed25519 key
        write_private(path, certs.ssh_private_pem(key))
        write_file(path.with_suffix(".pub"), certs.ssh_public_line(key) + "\n")
    return path


def ssh_cert_path(identity: UserIdentity, device: str, login: str) -> Path:
    return identity.directory / "ssh" / f"{login}@{device}-cert.pub"


def _cert_valid_for(path: Path, margin: dt.timedelta) -> bool:
    from cryptography.hazmat.primitives.serialization import (
        SSHCertificate,
        load_ssh_public_identity,
    )

    try:
        cert = load_ssh_public_identity(path.read_bytes())
    except (OSError, ValueError):
        return False
    if not isinstance(cert, SSHCertificate):  # a bare key where the certificate belongs
        return False
    left = dt.datetime.fromtimestamp(cert.valid_before, dt.UTC) - dt.datetime.now(dt.UTC)
    return left > margin


async def fetch_ssh_cert(identity: UserIdentity, device: str, login: str, *,
                         client: Client | None = None, force: bool = False) -> Path:
    """Get (or reuse, while it has a minute left) the certificate for LOGIN@DEVICE.

    ``client``: an open connection to use (the helper's warm one) instead of a new one;
    ``force``: fetch even when the cached certificate is still good (the helper renews it
    alongside a dial, so the next ``ssh`` finds it fresh and starts no Python for it).
    """
    device = strip_suffix(device)
    key = ensure_ssh_key(identity)
    path = ssh_cert_path(identity, device, login)
    if not force and _cert_valid_for(path, CERT_MIN_LEFT):
        return path
    own = client is None
    if client is None:
        client = await Client.connect(identity)
    try:
        body = await client.request("ssh-cert", device=device, login=login,
                                    public_key=key.with_suffix(".pub").read_text().strip())
    finally:
        if own:
            client.close()
            await asyncio.sleep(0.02)
    write_file(path, body["certificate"] + "\n")
    # ssh also looks for ``CertificateFile`` tokens expanded with the typed host name.
    alias = ssh_cert_path(identity, device + SUFFIX, login)
    if alias != path:
        write_file(alias, body["certificate"] + "\n")
    return path


def tunnel_command() -> str:
    """How ssh should call us back: the installed script, else this interpreter."""
    exe = shutil.which("tunnel")
    if exe and Path(exe).resolve().parent == Path(sys.executable).resolve().parent:
        return shlex.quote(exe)
    return f"{shlex.quote(sys.executable)} -m tunnel.cli"


def helper_client_command() -> str:
    """The standard-library ProxyCommand client, run isolated (``-I -S``: no site-packages, no
    PYTHON* variables) so it starts in milliseconds; it finds its package by its own path."""
    from tunnel import helper_client

    return f"{shlex.quote(sys.executable)} -I -S {shlex.quote(str(Path(helper_client.__file__).resolve()))}"


def ssh_config(identity: UserIdentity, hosts: str = f"*{SUFFIX}") -> str:
    """An ssh_config block for plain ``ssh LOGIN@DEVICE.fleet`` (or ``hosts='*'`` with -F).

    The ProxyCommand is ``tunnel/helper_client.py``: it asks the per-user helper (started on
    demand, ``tunnel.helper``) for the session over a Unix socket, and falls back to ``tunnel
    proxy-command`` when no helper can be had. ``Match exec`` fetches the LOGIN@DEVICE
    certificate through the same client when the cached one is older than FRESH_MINUTES (the
    helper renews it alongside each dial, so repeated connections start no Python for it). A
    certificate older than ``user.crt`` is never fresh: it came from the previous login, and
    its life ended with that login's certificate. ssh runs that check on every invocation,
    each task of an Ansible play included (connection sharing or not), so it is one shell and
    one ``find`` (``test`` is the shell's own), not a pipe into a ``grep`` too: 2.6 ms of CPU
    instead of 4.5, and under load about half the wait.

    Connection sharing is on, so OpenSSH discards the ProxyCommand's stderr; a refusal still
    reaches the engineer as an SSH disconnect that ssh prints (``tunnel.sshwire``). ``--login
    %r`` lets the proxy refuse a login no role allows with its reason (OpenSSH rejects shell
    metacharacters in a user name before expanding ``%r``).
    """
    d = identity.directory
    fast = helper_client_command()
    ident = f"--identity {shlex.quote(str(d))}"
    return f"""\
# fleet-tunnel: ssh/scp/ansible to devices through the proxy {identity.proxy[0]}:{identity.proxy[1]}
# Certificates are per login and device, fetched on demand; host keys are checked against the
# fleet host CA. Generated by 'tunnel config'. Sessions go through the per-user helper
# ('tunnel helper status|stop'); FLEET_HELPER=off makes ssh dial the proxy directly.
# ServerAlive* give a resumed session the 10 min the tunnel may be away (15 s x 40).
Match host {hosts} exec "test $(find {d}/ssh/%r@%n-cert.pub -mmin -{FRESH_MINUTES} -newer {d}/user.crt 2>/dev/null) || {fast} cert %n %r {ident}"
Host {hosts}
    ProxyCommand {fast} dial %n %p --login %r {ident}
    IdentityFile {d}/ssh/id_ed25519
    CertificateFile {d}/ssh/%r@%n-cert.pub
    IdentitiesOnly yes
    UserKnownHostsFile {d}/known_hosts
    StrictHostKeyChecking yes
    ControlMaster auto
    ControlPath {d}/ssh/cm-%r@%n
    ControlPersist 60s
    ServerAliveInterval 15
    ServerAliveCountMax 40
"""


def write_ssh_config(identity: UserIdentity, hosts: str) -> Path:
    ensure_ssh_key(identity)
    path = identity.directory / ("ssh_config" if hosts == f"*{SUFFIX}" else "ssh_config.all")
    write_file(path, ssh_config(identity, hosts))
    return path


def ssh_argv(identity: UserIdentity, target: str, command: list[str], extra: Sequence[str] = ()) -> list[str]:
    login, sep, device = target.rpartition("@")
    if not sep:
        raise ClientError("give the target as LOGIN@DEVICE")
    config = write_ssh_config(identity, "*")
    return ["ssh", "-F", str(config), *extra, f"{login}@{strip_suffix(device)}", *command]


# --- through the per-user helper ----------------------------------------------------------------


def proxy_text(identity: UserIdentity) -> str:
    """The identity's proxy as HOST:PORT (``[v6]:PORT``): what a helper must be connected to."""
    host, port = identity.proxy
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _refusal(reply: dict) -> ClientError:
    """A refusal the helper passed on, as the error the direct path would raise (the same words,
    the same code: the exit status follows it)."""
    return ClientError(reply.get("reason") or "refused", reply.get("code") or "refused")


def helper_request(identity: UserIdentity, name: str) -> dict | None:
    """The proxy's answer to ``name`` (``ls``, ``whoami``, ``status``) over the helper's warm
    connection (started on demand); None when no helper can be had — the caller then asks the
    proxy itself, as before the helper existed (``FLEET_HELPER=off``, no runtime directory, a
    helper connected to another proxy)."""
    from tunnel import helper_client

    reply = helper_client.fetch(str(identity.directory), name, proxy_text(identity))
    if reply is None:
        return None
    if not reply.get("ok"):
        raise _refusal(reply)
    return reply["body"]


def helper_ssh_cert(identity: UserIdentity, device: str, login: str) -> Path | None:
    """``fetch_ssh_cert`` through the helper (it reuses a certificate with a minute left, else
    asks on its warm connection); None when no helper can be had."""
    from tunnel import helper_client

    reply = helper_client.certificate(str(identity.directory), device, login, proxy_text(identity))
    if reply is None:
        return None
    if not reply.get("ok"):
        raise _refusal(reply)
    return Path(reply["path"])


def listen(host: str, port: int) -> socket.socket:
    """The local listening socket of ``tunnel forward``/``db``/``kube``, bound by the command
    itself (so a port in use is its own one-line error, before anything is dialed).

    Connections it accepts inherit ``SO_LINGER 0``: whichever process serves them, one still
    open when that process dies is reset, never ended as if complete.
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        sock = socket.create_server(address, family=family, backlog=128)
    except OSError as exc:
        raise ClientError(f"cannot listen on {host}:{port}: {exc.strerror or exc}: choose another "
                          "--local HOST:PORT (port 0 picks a free one)") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock


class _Detach(Exception):
    """SIGTERM/SIGINT while attached to the helper: detach, as Ctrl-C ends a direct forward."""


def _detach(signum, frame) -> None:
    raise _Detach


def _noted(signum, frame) -> None:
    """SIGTERM/SIGINT once attached: the wakeup pipe (``signal.set_wakeup_fd``) says it."""


def forward_via_helper(identity: UserIdentity, device: str, service: str, host: str, port: int,
                       ready=None, check: bool = True) -> bool:
    """``tunnel.client.forward``, served by the per-user helper; False when no helper can be had
    (nothing was dialed: the caller forwards by itself).

    The command binds ``host:port`` and hands the listening socket to the helper, which runs the
    preflight on its warm connection, then accepts and splices each connection. The command
    stays attached: it prints the line the helper sends for each connection refused or cut, and
    ``ready`` once the preflight passed. Ctrl-C or SIGTERM detaches (the helper stops listening
    and resets what is still open; exit 0, as before). The forward over for the helper (its
    connection to the proxy ended: ``unreachable``, exit 3) or the helper gone (killed, stopped:
    ``cut``, exit 4) raises ClientError with its one line.
    """
    from tunnel import helper_client

    listener = listen(host, port)
    previous = {sig: signal.signal(sig, _detach) for sig in (signal.SIGTERM, signal.SIGINT)}
    handoff = None
    try:
        handoff = helper_client.forward(str(identity.directory), device, service, listener.fileno(),
                                        proxy_text(identity), check)
        if handoff is None:
            return False
        result = handoff.result()
        if not result.get("ok"):
            raise _refusal(result)
        if ready:
            ready(listener.getsockname())
        # From here a signal only wakes the loop below (never raises inside it): a line read off
        # the helper's socket cannot be lost between the read and the print.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        previous_wakeup = signal.set_wakeup_fd(wake_w)
        try:
            for sig in previous:
                signal.signal(sig, _noted)
            for event in handoff.events(wake_r):
                if "say" in event:
                    print(event["say"], file=sys.stderr, flush=True)
                elif event.get("end"):
                    raise ClientError(event.get("reason") or "the forward ended", event.get("code") or "cut")
            else:
                raise _Detach  # woken by SIGTERM/SIGINT
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            os.close(wake_r)
            os.close(wake_w)
    except _Detach:
        if handoff is not None:  # what the helper already said still reaches the engineer
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            for event in handoff.pending():
                if "say" in event:
                    print(event["say"], file=sys.stderr, flush=True)
    finally:
        if handoff is not None:
            handoff.close()
        listener.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return True


# --- kube and db --------------------------------------------------------------------------------


def kube_user(client_certificate: Path | None, client_key: Path | None, token_file: Path | None) -> dict:
    """The kubeconfig ``user`` for the device's cluster: the engineer's own cluster credential.

    The tunnel only carries bytes to the device's API server, which keeps its own
    authentication: the fleet identity means nothing to it. So the user entry points at the
    credential the cluster issued to the engineer — a client certificate and key, or a bearer
    token file — by absolute path (kubectl reads the files; no secret is copied into the
    kubeconfig). Without one, kubectl would prompt "Please enter Username:" against a cluster
    that does not take passwords: refuse instead, saying what to pass.
    """
    if token_file and (client_certificate or client_key):
        raise ClientError("pass either --token-file or --client-certificate with --client-key, not both")
    if bool(client_certificate) != bool(client_key):
        raise ClientError("--client-certificate and --client-key go together: pass both")
    if not (token_file or client_certificate):
        raise ClientError("no credential for the device's cluster: kubectl would prompt for a username. "
                          "Pass --client-certificate FILE --client-key FILE (a client certificate the "
                          "cluster accepts) or --token-file FILE (a bearer token, e.g. a service account's)")
    user: dict = {}
    for key, path in (("client-certificate", client_certificate), ("client-key", client_key),
                      ("tokenFile", token_file)):
        if path is None:
            continue
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise ClientError(f"{path} is not a readable file: check the path given for {key}")
        try:
            path.open("rb").close()
        except OSError as exc:
            raise ClientError(f"cannot read {path} ({exc.strerror}): check its permissions") from None
        user[key] = str(path)
    return user


def kubeconfig_entry(device: str, port: int, ca_file: Path | None, server_name: str | None,
                     user: dict | None = None) -> dict:
    cluster: dict = {"server": f"https://127.0.0.1:{port}"}
    if ca_file:
        cluster["certificate-authority-data"] = base64.b64encode(ca_file.read_bytes()).decode()
    if server_name:
        cluster["tls-server-name"] = server_name
    name = f"fleet-{device}"
    entry = {"cluster": {"name": name, "cluster": cluster},
             "context": {"name": name, "context": {"cluster": name, "user": name}}}
    if user is not None:
        entry["user"] = {"name": name, "user": user}
    return entry


def _load_kubeconfig(path: Path) -> dict:
    import yaml

    config = yaml.safe_load(path.read_text()) if path.exists() else None
    return config or {"apiVersion": "v1", "kind": "Config", "clusters": [], "contexts": [], "users": []}


def merge_kubeconfig(path: Path, device: str, entry: dict) -> str | None:
    """Add or replace the device's cluster, context and user; keep everything else in the file.

    Returns the ``current-context`` it replaced, for ``unmerge_kubeconfig`` to restore.
    """
    import yaml

    config = _load_kubeconfig(path)
    previous = config.get("current-context")
    name = entry["cluster"]["name"]
    for key, kind in (("clusters", "cluster"), ("contexts", "context"), ("users", "user")):
        items = [x for x in config.get(key) or [] if x.get("name") != name]
        config[key] = items + ([entry[kind]] if kind in entry else [])
    config["current-context"] = name
    write_file(path, yaml.safe_dump(config, sort_keys=False), 0o600)
    return previous


def unmerge_kubeconfig(path: Path, device: str, previous: str | None) -> None:
    """Undo ``merge_kubeconfig`` when ``tunnel kube`` ends: its port is dead from then on.

    Removes the ``fleet-DEVICE`` cluster, context and user, and gives ``current-context`` back
    to ``previous`` — unless the engineer switched context meanwhile: that choice stays.
    """
    import yaml

    if not path.exists():
        return
    config = _load_kubeconfig(path)
    name = f"fleet-{device}"
    for key in ("clusters", "contexts", "users"):
        config[key] = [x for x in config.get(key) or [] if x.get("name") != name]
    if config.get("current-context") == name:
        if previous and previous != name:
            config["current-context"] = previous
        else:
            config.pop("current-context", None)
    write_file(path, yaml.safe_dump(config, sort_keys=False), 0o600)


