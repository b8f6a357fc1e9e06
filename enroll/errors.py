"""The one error root of fleet-tunnel, and the exit statuses its commands use.

Every error the project raises for a user or a caller to handle derives from ``FleetError``.
``code`` is a stable machine name (scripts, the audit log and ``--format json`` carry it);
``exit_status`` is what a command exits with when the error reaches its top level. Callers
decide by these two attributes, never by message text: both CLIs' ``main`` catch ``FleetError``
once and exit with ``exc.exit_status``. This module is pure (no I/O, no imports) so the device
install, ``enroll`` and ``tunnel`` can all raise and catch it.

A subclass names its code on its ``class`` line, and keeps the standard base it had before the
root existed, so older ``except ValueError`` clauses still catch it::

    class TokenError(FleetError, ValueError, code="token"): ...

A class that covers several outcomes sets ``self.code`` per instance instead (a refusal's code
comes from the proxy, a renewal's from the CA step).
"""

from __future__ import annotations

#: exit statuses shared by ``tunnel`` and ``enroll`` (2 is argparse's usage error)
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_CUT, EXIT_RETIRED = 0, 1, 2, 3, 4, 5


class FleetError(Exception):
    """Root of the project's errors: a one-line message, a stable ``code``, an ``exit_status``.

    Subclasses set ``code``/``exit_status`` as class keywords (``class X(FleetError,
    code="x")``) or class attributes, or per instance when one class covers several outcomes.
    """

    code: str = "error"
    exit_status: int = EXIT_REFUSED

    def __init_subclass__(cls, *, code: str | None = None, exit_status: int | None = None,
                          **kwargs: object) -> None:
        # keywords on the class line keep a subclass's whole declaration on that one line
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if exit_status is not None:
            cls.exit_status = exit_status


class RegistryError(FleetError, RuntimeError):
    """The registry cannot be opened or used; the message says what to do."""

    code = "registry"
