"""``enroll backup DEST``: a consistent copy of the live registry, with its audit chain checked.

The copy uses SQLite's online backup API in a single step: it reads one snapshot inside one read
transaction. In WAL mode (the registry's) a reader never blocks the proxy's writers, so the proxy
keeps admitting agents and auditing sessions meanwhile; and a single step never restarts, as a
page-by-page backup would each time a busy proxy commits. The copy is then made a standalone
file (``journal_mode=DELETE``), checked (``PRAGMA integrity_check``), and its audit chain is
verified against the head of the live log read *before* the copy began: every event that was
committed then is in the copy, unchanged.

DEST is created 0600 (it holds the whole audit log and every token hash) and never overwritten:
the copy is written beside it and linked into place only if DEST still does not exist.

Only the registry is copied. The state directory's keys (CA, SSH CAs, proxy) change only when
an operator acts; back them up with the same care as the CA key itself (see README, "Backup,
restore and upgrades").
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from enroll import audit
from enroll.errors import FleetError
from enroll.state import FleetState


class BackupError(FleetError, ValueError, code="backup"):
    """The backup was refused or failed; the message says what to do. DEST was not written."""


@dataclass(frozen=True)
class Backup:
    path: Path
    source: Path
    bytes: int
    schema: int
    events: int
    anchor: str  # SEQ:HASH of the copy's last event
    broken: audit.ChainBreak | None  # the copy (hence the live log) has a broken chain

    def as_dict(self) -> dict:
        return {
            "backup": str(self.path), "source": str(self.source), "bytes": self.bytes,
            "schema": self.schema, "events": self.events, "anchor": self.anchor,
            "chain": "ok" if self.broken is None else f"broken at event {self.broken.seq}: {self.broken.problem}",
        }


def backup(state: FleetState, dest: Path | str) -> Backup:
    """Copy ``state``'s registry to ``dest`` (new file, 0600) and verify the copy's audit chain.

    A broken chain is reported in the result (``broken``), not raised: the copy is faithful and
    is kept as evidence; the caller exits non-zero.
    """
    dest = Path(dest)
    state.config  # noqa: B018 - a missing state directory fails here with its clear message
    source = state.registry_path
    if not source.is_file():
        raise BackupError(f"no registry at {source}: is --state the fleet's state directory?")
    if dest.exists() or dest.is_symlink():
        raise BackupError(f"{dest} already exists: a backup never overwrites; choose a new name "
                          "(e.g. with the date) or move the old file away")
    if not dest.parent.is_dir():
        raise BackupError(f"{dest.parent} is not a directory: create it first")
    with contextlib.suppress(OSError):
        if dest.parent.resolve() == source.parent.resolve() and dest.name.startswith("registry.db"):
            raise BackupError(f"{dest} would sit among the live registry's own files: choose another name")

    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # 0600 before any byte
    try:
        result = _copy_and_check(source, tmp, dest)
        try:
            os.link(tmp, dest)  # atomic, and fails if DEST appeared meanwhile
        except FileExistsError:
            raise BackupError(f"{dest} appeared while the backup ran: not overwritten; "
                              "choose a new name") from None
        _fsync_dir(dest.parent)
        return result
    finally:
        tmp.unlink(missing_ok=True)
        for suffix in ("-journal", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)


def _copy_and_check(source: Path, tmp: Path, dest: Path) -> Backup:
    try:
        live = sqlite3.connect(str(source), timeout=30)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open registry {source}: {exc}") from None
    try:
        live.execute("PRAGMA busy_timeout=30000")
        before = audit.tip(sqlite_utils.Database(live))  # what the copy must contain, unchanged
        copy = sqlite3.connect(str(tmp))
        try:
            live.backup(copy)  # all pages in one step: one snapshot, never restarted
        except sqlite3.Error as exc:
            copy.close()
            raise BackupError(f"the online backup of {source} failed: {exc}; nothing was written "
                              "to the destination (is the disk full?)") from None
    finally:
        live.close()
    try:
        copy.execute("PRAGMA journal_mode=DELETE")  # a standalone file: no -wal beside it
        check = copy.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            raise BackupError(f"the copy failed SQLite's integrity check ({check}); nothing was "
                              "written to the destination: check the disk, then retry")
        db = sqlite_utils.Database(copy)
        schema = copy.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0
        broken = audit.verify(db, before if before[0] else None)
        events = copy.execute("SELECT count(*) FROM audit").fetchone()[0]
        seq, digest = audit.tip(db)
        copy.commit()
    finally:
        copy.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return Backup(dest, source, tmp.stat().st_size, schema, events, f"{seq}:{digest}", broken)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
