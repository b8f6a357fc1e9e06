"""Errors every command reports as one clear line (exit status 1), importable without SQLite."""


class RegistryError(RuntimeError):
    """The registry cannot be opened or used; the message says what to do."""
