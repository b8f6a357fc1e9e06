"""Reading secrets (join tokens, invites, one-time codes) without putting them on the command line.

Any local user can read every process's ``/proc/PID/cmdline``, so a secret passed as an argument
is published for as long as the process runs. ``/proc/PID/environ`` and files are readable only by
the owner, and a pipe or a terminal prompt leaves nothing behind. So a secret comes, in this
order, from ``--X-file FILE`` (``-`` reads one line from stdin, or prompts when stdin is a
terminal), from an environment variable (``FLEET_TOKEN``, ``FLEET_INVITE``, ``FLEET_TOTP``), or
from a prompt when stdin is a terminal. ``--token`` alone means ``--token-file -``; the old
``--token VALUE`` style still parses, but only to refuse with a message that says how to pass the
secret instead (:class:`ArgvSecretAction`).

Secrets that start with ``-`` (about 1 invite in 64) work in every one of these ways, unlike an
option value.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import sys

from enroll.errors import FleetError

MAX_SECRET_BYTES = 4096


class SecretError(FleetError, ValueError, code="secret"):
    """A secret could not be read; the message says from where and what to do."""


def _clean(text: str, what: str, where: str) -> str:
    value = text.strip()
    if not value:
        raise SecretError(f"the {what} read from {where} is empty")
    if any(c in value for c in "\r\n\0"):
        raise SecretError(f"the {what} read from {where} spans several lines: put only the {what} there")
    return value


def _prompt(what: str) -> str:
    return _clean(getpass.getpass(f"{what}: "), what, "the terminal")


def read_secret(what: str, *, file: str | None, env: str, prompt: bool = False,
                stdin=None, environ=None) -> str | None:
    """The secret from ``file`` (``-``: stdin), else ``$env``, else a prompt on a terminal.

    Returns None when none of these gave one (the caller says what is missing). The environment
    variable is removed once read, so child processes do not inherit it.
    """
    stdin = stdin if stdin is not None else sys.stdin
    environ = environ if environ is not None else os.environ
    if file == "-":
        if stdin.isatty():
            return _prompt(what)
        return _clean(stdin.readline(MAX_SECRET_BYTES), what, "stdin")
    if file is not None:
        try:
            with open(file, "rb") as f:
                data = f.read(MAX_SECRET_BYTES + 1)
        except FileNotFoundError:
            raise SecretError(f"no such {what} file: {file}") from None
        except PermissionError:
            raise SecretError(f"cannot read the {what} file {file}: permission denied") from None
        if len(data) > MAX_SECRET_BYTES:
            raise SecretError(f"the {what} file {file} is larger than {MAX_SECRET_BYTES} bytes: put only the {what} there")
        try:
            return _clean(data.decode(), what, file)
        except UnicodeDecodeError:
            raise SecretError(f"the {what} file {file} is not text") from None
    if environ.get(env):
        return _clean(environ.pop(env), what, f"${env}")
    if prompt and stdin.isatty():
        return _prompt(what)
    return None


class ArgvSecretAction(argparse.Action):
    """``--token`` (``--invite``, ``--totp``) with no value: read the secret as ``--token-file -``
    does (a prompt on a terminal, else one line of stdin). With a value — the old, leaky style —
    a usage error that says how to pass it instead."""

    def __init__(self, option_strings, dest, *, env: str, file_flag: str, what: str, **kw):
        self.env, self.file_flag, self.what = env, file_flag, what
        self.file_dest = file_flag.lstrip("-").replace("-", "_")
        super().__init__(option_strings, dest, nargs="?", const=None, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            setattr(namespace, self.file_dest, "-")
            return
        parser.error(
            f"{option_string} VALUE would put the {self.what} on the command line, where any local "
            f"user can read it (/proc/PID/cmdline): pass it in ${self.env}, or with {self.file_flag} "
            f"FILE ({self.file_flag} - reads it from stdin, or asks for it on a terminal)"
        )


def env_command(env: str, secret: str, argv: list[str]) -> str:
    """A shell command line that hands ``secret`` over in ``$env``: argv-free for the program,
    and quoted so any secret (one starting with ``-`` too) survives copy and paste."""
    return f"{env}={shlex.quote(secret)} " + " ".join(shlex.quote(a) for a in argv)
