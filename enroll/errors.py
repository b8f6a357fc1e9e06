"""The one error root of fleet-tunnel, and the exit statuses its commands use.

Every error the project raises for a user or a caller to handle derives from ``FleetError``.
``code`` is a stable machine name (scripts, the audit log and ``--format json`` carry it);
``exit_status`` is what a command exits with when the error reaches its top level. Callers
decide by these two attributes, never by message text. This module is pure (no I/O, no
imports) so the device install, ``enroll`` and ``tunnel`` can all raise and catch it.
"""

from __future__ import annotations

#: exit statuses shared by ``tunnel`` and ``enroll`` (2 is argparse's usage error)
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_CUT, EXIT_RETIRED = 0, 1, 2, 3, 4, 5


class FleetError(Exception):
    """Root of the project's errors: a one-line message, a stable ``code``, an ``exit_status``.

    Subclasses set ``code``/``exit_status`` as class attributes, or per instance when one class
    covers several outcomes (a refusal's code comes from the proxy).
    """

    code: str = "error"
    exit_status: int = EXIT_REFUSED


class RegistryError(FleetError, RuntimeError):
    """The registry cannot be opened or used; the message says what to do."""

    code = "registry"
