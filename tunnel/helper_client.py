"""ssh's ProxyCommand through the per-user helper, importing only the standard library.

    python -I -S .../tunnel/helper_client.py dial DEVICE PORT [--login LOGIN] [--identity DIR]
    python -I -S .../tunnel/helper_client.py cert DEVICE LOGIN [--identity DIR]

Why a separate, tiny program: ``tunnel proxy-command`` spends 170–230 ms importing aioquic,
cryptography and YAML before it sends a byte. This one starts in a few milliseconds (``-I -S``:
no site-packages, no environment), asks the helper (``tunnel.helper``) over its Unix socket for a
stream to LOGIN@DEVICE:PORT, and splices stdin/stdout with it. It imports ``tunnel`` from the
directory it was run from, and only ``helper_protocol`` and ``sshwire`` from it (both stdlib-only;
a test holds it to that).

- No helper answering (none, a stale socket file, one owned by another user, a process of
  another uid behind it, an older or newer version, a helper of a replaced identity): it starts
  one, detached, and waits for it; never prompts, never hangs on a stuck helper (the ack must
  come within ``ACK_TIMEOUT``).
- No helper can be had (``FLEET_HELPER=off``, a start that fails, a socket path too long): it
  execs the direct path, ``tunnel proxy-command`` (``tunnel ssh-cert`` for ``cert``), which is
  what ssh ran before.
- Refused before the session opens: the SSH identification and SSH_MSG_DISCONNECT on stdout
  (``tunnel.sshwire``: ssh prints the reason even under connection sharing), one line on
  stderr, exit status 1 (3: the proxy is unreachable), exactly as ``tunnel proxy-command``.
- A session cut (the helper killed, the device gone, ``tunnel helper stop``): one line on stderr
  and exit status 4, and stdout just ends — a pipe cannot carry a reset, so the exit status
  says it (issue 19's rule), as for ``tunnel proxy-command``.
"""

from __future__ import annotations

import _socket  # not socket: its enum and selectors imports cost ~10 ms per ssh
import os
import stat
import sys
import time

TYPE_CHECKING = False  # not typing's: importing typing costs ~6 ms per ssh
if TYPE_CHECKING:
    import subprocess

if __name__ == "__main__" and not __package__:
    _HERE = os.path.dirname(os.path.abspath(__file__))
    # never import sibling modules as top-level ones; import the package this file belongs to
    sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from tunnel import helper_protocol as hp  # noqa: E402

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: how long a client waits for a helper it started to answer before it takes the direct path
START_WAIT = 15.0
#: a dial's result: the helper's own connect (10 s) and dial (20 s) timeouts come first
RESULT_TIMEOUT = 40.0
CHUNK = 256 * 1024
EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_CUT = 0, 1, 3, 4


class Unusable(Exception):
    """This socket has no helper of ours behind it (a new one should replace it)."""


class HelperGone(Exception):
    """The helper ended the conversation before answering."""


class Declined(Exception):
    """A helper of ours, but not for this command (connected to another proxy): go direct."""


def identity_dir(given: str | None) -> str:
    """``--identity``, else ``$FLEET_IDENTITY``, else ``$XDG_CONFIG_HOME/fleet-tunnel`` (the same
    rule as ``tunnel.client.default_identity_dir``), made absolute."""
    path = given or os.environ.get("FLEET_IDENTITY")
    if not path:
        config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        path = os.path.join(config, "fleet-tunnel")
    return os.path.abspath(os.path.expanduser(path))


class Lines:
    """Lines off a socket, keeping what follows them (the first frames) for the splice."""

    def __init__(self, sock: _socket.socket):
        self.sock, self.buffer = sock, b""

    def line(self, timeout: float | None) -> dict:
        self.sock.settimeout(timeout)
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > hp.MAX_LINE:
                raise hp.ProtocolError("the helper sent an overlong line")
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise Unusable(f"the helper did not answer within {timeout:.0f}s") from None
            except OSError as exc:
                raise HelperGone(f"the helper went away: {exc.strerror or exc}") from None
            if not data:
                raise HelperGone("the helper closed the connection")
            self.buffer += data
        line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1:]
        return hp.decode_line(line)


def connect(path: str) -> _socket.socket:
    """A connection to the helper at ``path``, if a process of ours listens there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise Unusable("no helper is running") from None
    except OSError as exc:
        raise Unusable(f"cannot look at {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise Unusable(f"{path} is not a socket of uid {os.getuid()} (uid {st.st_uid}): replacing it")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(hp.ACK_TIMEOUT)
    try:
        sock.connect(path)
        _pid, uid, _gid = struct_unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))
    except OSError as exc:
        sock.close()
        raise Unusable(f"stale socket {path}: {exc.strerror or exc}") from None
    if uid != os.getuid():
        sock.close()
        raise Unusable(f"the process behind {path} runs as uid {uid}, not {os.getuid()}: replacing it")
    return sock


def struct_unpack(data: bytes) -> tuple[int, int, int]:
    pid, uid, gid = (int.from_bytes(data[i:i + 4], sys.byteorder, signed=True) for i in (0, 4, 8))
    return pid, uid, gid


def ask(directory: str, path: str, op: str, fields: dict) -> tuple[_socket.socket, Lines, dict]:
    """Send one request; return the socket, its line reader and the ack. Raises Unusable when
    this helper should be replaced (wrong version, stale identity, stuck), Declined when it is
    sound but connected to another proxy than the command's."""
    sock = connect(path)
    lines = Lines(sock)
    try:
        sock.sendall(hp.request(op, hp.code_version(), hp.identity_stamp(directory), **fields))
        ack = lines.line(hp.ACK_TIMEOUT)
    except (OSError, HelperGone, hp.ProtocolError) as exc:
        sock.close()
        raise Unusable(f"no answer from the helper: {exc}") from None
    except Unusable:
        sock.close()
        raise
    if not ack.get("ok"):
        sock.close()
        if ack.get("code") == hp.OTHER_PROXY:
            raise Declined(ack.get("reason"))
        raise Unusable(f"the helper refused: {ack.get('reason')} ({ack.get('code')})")
    return sock, lines, ack


def _env() -> dict:
    """The environment for processes we start: this package first on their path."""
    env = dict(os.environ)
    parts = [PACKAGE_PARENT] + [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


#: start_helper's answer when another client is starting the helper right now
BUSY = "busy"


class Started:
    """A helper this client started, and the start lock it holds until it stops waiting for it."""

    __slots__ = ("process", "start_lock")

    def __init__(self, process: subprocess.Popen[bytes], start_lock: int) -> None:
        self.process = process
        self.start_lock = start_lock


def start_helper(directory: str, path: str) -> Started | str | None:
    """Start a helper, detached (its own session, stdio on a log file). ``BUSY`` if another
    client is starting one right now (it holds the start lock); None if none can be started."""
    import fcntl
    import subprocess

    runtime = os.path.dirname(path)
    try:
        os.makedirs(runtime, mode=0o700, exist_ok=True)
        lock = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return BUSY
    log_path = path[: -len(".sock")] + ".log"
    try:
        if os.path.getsize(log_path) > 1 << 20:
            os.truncate(log_path, 0)
    except OSError:
        pass
    try:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunnel.cli", "helper", "run", "--identity", directory],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True, cwd="/", env=_env(),
        )
        os.close(log)
    except OSError:
        os.close(lock)
        return None
    return Started(proc, lock)  # the lock is held until we stop waiting for it


def obtain(directory: str, op: str, fields: dict, start: bool = True):
    """(socket, lines, ack) from a helper of ours, starting one if needed; None if none can be
    had (the caller then takes the direct path)."""
    if os.environ.get("FLEET_HELPER", "on").lower() in ("0", "off", "no", "false"):
        return None
    path = hp.socket_path(directory)
    if len(path.encode()) > hp.MAX_SOCKET_PATH:
        return None
    deadline = time.monotonic() + START_WAIT
    proc: Started | str | None = None
    try:
        while True:
            try:
                return ask(directory, path, op, fields)
            except Declined:
                return None
            except Unusable:
                if not start:
                    return None
            if proc is None:
                proc = start_helper(directory, path)
                if proc is None:
                    return None  # no runtime directory, no interpreter: the direct path at once
            elif isinstance(proc, Started) and proc.process.poll() is not None:
                return None  # it could not start (see its log): the direct path will say why
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
    finally:
        if isinstance(proc, Started):
            os.close(proc.start_lock)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def refuse(reply: dict) -> int:
    """A refusal before any session byte: ssh gets it as a server's disconnect (see sshwire)."""
    from tunnel import sshwire  # only on a refusal: ~1 ms of every ssh otherwise

    reason = reply.get("reason") or "refused"
    unreachable = reply.get("code") == "unreachable"
    # Not sooner than REFUSAL_FLOOR after ssh started us: Ansible writes its first data (the
    # module, an sftp batch) to ssh's stdin right after starting ssh, and if ssh, refused within
    # milliseconds, is already gone, Ansible reports "Broken pipe" instead of ssh's stderr line.
    time.sleep(max(0.0, STARTED + REFUSAL_FLOOR - time.monotonic()))
    with _suppress():  # ssh already gone: the stderr line is all we can do
        _write_all(1, sshwire.refusal(reason, sshwire.SERVICE_NOT_AVAILABLE if unreachable else sshwire.BY_APPLICATION))
    say(reason)
    linger()
    return EXIT_UNAVAILABLE if unreachable else EXIT_REFUSED


#: how long a refused client keeps reading what ssh sends before it exits
LINGER = 3.0
#: the earliest a refusal is handed to ssh, counted from this client's start (see ``refuse``):
#: 0.5 s lost Ansible's reason to its own "Broken pipe" on a loaded 2-core machine (a playbook's
#: worker started writing later than that); a refused ssh costs this long, not a session
REFUSAL_FLOOR = 1.0
STARTED = time.monotonic()


def linger() -> None:
    """Read (and drop) what ssh still writes — its identification, its KEXINIT — until it closes
    our stdin, for at most LINGER seconds. Exiting at once would close the pipe under ssh's next
    write, and ssh would die of EPIPE (``Broken pipe``) before it reads and prints our disconnect.
    """
    import select

    deadline = time.monotonic() + LINGER
    with _suppress():
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([0], [], [], left)[0] or not os.read(0, CHUNK):
                return


def say(line: str) -> None:
    with _suppress():
        os.write(2, f"tunnel: error: {line}\n".encode())


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


#: how long, once ssh closed its side, the device's side gets to end before this client exits
END_WAIT = 3.0


def _hangup(signum, frame) -> None:
    """ssh's SIGHUP as it exits: noted, not fatal (see ``splice``)."""


def splice(sock: _socket.socket, pending: bytes, what: str) -> int:
    """stdin → DATA frames → helper; helper's frames → stdout; until both directions ended.

    END from the helper closes stdout (a clean end); CUT, a bad frame, or the helper's socket
    ending without END is a cut: one line on stderr, exit status 4.

    ssh, as it exits, closes both pipes and at once sends its ProxyCommand SIGHUP. Dying of it
    would drop the helper's socket before the device's side ended: the helper would see a
    cut, and the proxy and agent would hold the session for resuming (minutes, with the
    device's sshd connection open) and audit it as an error, although ssh ended it the way
    a closed TCP connection ends (every ssh master that ControlPersist retires, every
    Ansible run). So SIGHUP is caught; the closed stdin sends END, as a FIN would, and the
    client waits up to END_WAIT for the device's END, then exits as before (a cut).
    """
    # _signal, not signal: signal imports enum (~10 ms of every dial); typeshed has no stub for
    # this C module, whose signal() and SIGHUP are the ones signal re-exports
    import _signal  # type: ignore[import-not-found]
    import select

    _signal.signal(_signal.SIGHUP, _hangup)
    sock.settimeout(None)
    decoder = hp.FrameDecoder()
    received = 0
    out_open, in_open = True, True
    in_ended = 0.0
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(0, select.POLLIN)

    def cut(why: str) -> int:
        say(f"session to {what} cut after {received} bytes received: {why}")
        return EXIT_CUT

    def take(frames) -> str | None:
        nonlocal received, out_open
        for kind, payload in frames:
            if kind == hp.DATA:
                if not out_open:
                    return "data after the end of the session"
                _write_all(1, payload)
                received += len(payload)
            elif kind == hp.END:
                out_open = False
                os.close(1)
            else:
                return payload.decode(errors="replace") or "cut"
        return None

    try:
        why = take(decoder.feed(pending))
        if why:
            return cut(why)
        while out_open or in_open:
            timeout = None if in_open else max(0.0, in_ended + END_WAIT - time.monotonic())
            events = poller.poll(None if timeout is None else int(timeout * 1000) + 1)
            if not events and not in_open and time.monotonic() >= in_ended + END_WAIT:
                return cut(f"the device did not end its side within {END_WAIT:g}s of ssh closing its own")
            for fd, _event in events:
                if fd == 0:
                    data = os.read(0, CHUNK)
                    if data:
                        sock.sendall(hp.data_frames(data))
                    else:
                        sock.sendall(hp.frame(hp.END))
                        poller.unregister(0)
                        in_open = False
                        in_ended = time.monotonic()
                else:
                    data = sock.recv(CHUNK)
                    if not data:
                        if out_open or in_open:
                            return cut("the helper went away (its connection ended without an end of session)")
                        break
                    why = take(decoder.feed(data))
                    if why:
                        return cut(why)
    except hp.ProtocolError as exc:
        return cut(f"bad frame from the helper: {exc}")
    except OSError as exc:
        with _suppress():  # tell the helper, so the device side is reset rather than ended
            sock.sendall(hp.frame(hp.CUT, f"the local side failed: {exc.strerror or exc}".encode()))
        return cut(exc.strerror or str(exc))
    return EXIT_OK


def direct(argv: list[str]) -> int:
    """Exec ``tunnel ARGV`` — the path ssh took before the helper existed."""
    with _suppress():
        sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tunnel.cli", *argv], _env())
    return EXIT_REFUSED  # not reached


def dial(directory: str, device: str, port: str, login: str | None) -> int:
    fields = {"device": device, "service": port, "login": login,
              "hold": os.environ.get("FLEET_RESUME_HOLD") or None}
    fallback = ["proxy-command", device, port, "--identity", directory] + (["--login", login] if login else [])
    got = obtain(directory, "dial", fields)
    if got is None:
        return direct(fallback)
    sock, lines, _ack = got
    try:
        result = lines.line(RESULT_TIMEOUT)
    except (HelperGone, Unusable, hp.ProtocolError):
        sock.close()
        return direct(fallback)  # nothing written to ssh yet: the direct path can still serve it
    if not result.get("ok"):
        return refuse(result)
    return splice(sock, lines.buffer, f"{device}/{port}")


def cert(directory: str, device: str, login: str) -> int:
    fallback = ["ssh-cert", device, login, "--identity", directory]
    got = obtain(directory, "cert", {"device": device, "login": login})
    if got is None:
        return direct(fallback)
    sock, lines, _ack = got
    try:
        result = lines.line(RESULT_TIMEOUT)
    except (HelperGone, Unusable, hp.ProtocolError):
        return direct(fallback)
    finally:
        sock.close()
    if result.get("ok"):
        return EXIT_OK
    say(result.get("reason") or "refused")
    return EXIT_UNAVAILABLE if result.get("code") == "unreachable" else EXIT_REFUSED


def certificate(directory: str, device: str, login: str, proxy: str | None = None) -> dict | None:
    """``tunnel ssh-cert`` through the helper: ``{"ok": True, "path": …}`` or the refusal
    (``code``, ``reason``); None when no helper can be had (the caller fetches it itself)."""
    got = obtain(directory, "cert", {"device": device, "login": login, "proxy": proxy})
    if got is None:
        return None
    sock, lines, _ack = got
    try:
        return lines.line(RESULT_TIMEOUT)
    except (HelperGone, Unusable, hp.ProtocolError):
        return None
    finally:
        sock.close()


def fetch(directory: str, name: str, proxy: str | None = None, timeout: float = RESULT_TIMEOUT) -> dict | None:
    """A read-only proxy request (``ls``, ``whoami``, ``status``) on the helper's warm connection.

    ``{"ok": True, "body": …}``, or the refusal as the proxy (or the helper's dial) gave it
    (``code``, ``reason``). None when no helper can be had, or it went away before the whole
    answer: the caller then asks the proxy itself (these requests only read: asking twice is
    harmless).
    """
    import json

    got = obtain(directory, "request", {"name": name, "proxy": proxy})
    if got is None:
        return None
    sock, lines, _ack = got
    try:
        result = lines.line(timeout)
        if not result.get("ok"):
            return result
        decoder, body, pending = hp.FrameDecoder(), bytearray(), lines.buffer
        sock.settimeout(timeout)
        while True:
            for kind, payload in decoder.feed(pending):
                if kind == hp.DATA:
                    body += payload
                elif kind == hp.END:
                    return {"ok": True, "body": json.loads(body)}
                else:
                    return None  # cut: the helper stopped mid-answer
            pending = sock.recv(CHUNK)
            if not pending:
                return None
    except (HelperGone, Unusable, hp.ProtocolError, OSError, ValueError):
        return None
    finally:
        sock.close()


class Forwarding:
    """``tunnel forward``/``db``/``kube`` attached to the helper that serves its listening socket."""

    def __init__(self, sock: _socket.socket, lines: Lines):
        self.sock, self.lines = sock, lines

    def result(self) -> dict:
        """The preflight's answer: ``ok``, or the refusal (``code``, ``reason``)."""
        try:
            return self.lines.line(RESULT_TIMEOUT)
        except (HelperGone, Unusable, hp.ProtocolError) as exc:
            return {"ok": False, "code": "unreachable", "reason": f"the helper did not answer: {exc}"}

    def events(self, wake: int | None = None):
        """``{"say": LINE}`` per connection refused or cut, until the end: ``{"end": True, "code",
        "reason"}`` from the helper, or a cut one when the helper went away without it (killed).
        Stops early, losing no line, once ``wake`` (a signal's wakeup pipe) is readable."""
        while True:
            if wake is not None and b"\n" not in self.lines.buffer:
                import select

                if wake in select.select([self.sock.fileno(), wake], [], [])[0]:
                    return  # the caller drains what is on its way (pending)
            try:
                event = self.lines.line(None)
            except (HelperGone, Unusable, hp.ProtocolError) as exc:
                yield {"end": True, "code": "cut",
                       "reason": f"the helper went away ({exc}): every connection it forwarded was reset"}
                return
            yield event
            if event.get("end"):
                return

    def pending(self, timeout: float = 0.3) -> list[dict]:
        """Lines the helper already sent (a connection reset just before the command stops:
        its reason is on its way), waiting at most ``timeout`` for the next."""
        events: list[dict] = []
        while True:
            try:
                events.append(self.lines.line(timeout))
            except (HelperGone, Unusable, hp.ProtocolError):
                return events

    def close(self) -> None:
        """Detach: the helper stops listening and resets the connections still open."""
        self.sock.close()


def forward(directory: str, device: str, service: str, listener_fd: int, proxy: str | None,
            check: bool) -> Forwarding | None:
    """Hand the command's listening socket to the helper (``SCM_RIGHTS`` right after the ack).

    None when no helper can be had: nothing was dialed, and the caller forwards by itself.
    """
    got = obtain(directory, "forward", {"device": device, "service": service, "proxy": proxy,
                                        "check": "yes" if check else "no",
                                        "hold": os.environ.get("FLEET_RESUME_HOLD") or None})
    if got is None:
        return None
    sock, lines, _ack = got
    try:
        sock.sendmsg([hp.FD_BYTE], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                     listener_fd.to_bytes(4, sys.byteorder, signed=True))])
    except OSError:
        sock.close()
        return None
    return Forwarding(sock, lines)


def query(directory: str, op: str) -> dict | None:
    """``status`` or ``stop`` of the running helper (none is started); None if there is none."""
    got = obtain(directory, op, {}, start=False)
    if got is None:
        return None
    sock, lines, ack = got
    try:
        return lines.line(hp.ACK_TIMEOUT) if op == "status" else ack
    except (HelperGone, Unusable, hp.ProtocolError):
        return ack
    finally:
        sock.close()


USAGE = ("usage: helper_client.py dial DEVICE PORT [--login LOGIN] [--identity DIR]\n"
         "       helper_client.py cert DEVICE LOGIN [--identity DIR]\n")


def main(argv: list[str]) -> int:
    options: dict[str, str] = {}
    words: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--login", "--identity"):
            value = next(it, None)
            if value is None:
                break
            options[arg[2:]] = value
        else:
            words.append(arg)
    else:
        directory = identity_dir(options.get("identity"))
        if len(words) == 3 and words[0] == "dial":
            return dial(directory, words[1], words[2], options.get("login"))
        if len(words) == 3 and words[0] == "cert" and "login" not in options:
            return cert(directory, words[1], words[2])
    os.write(2, USAGE.encode())
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
