"""Where ``analyze`` writes: a staging folder inside the output folder, moved into place at the end.

A folder with a ``report.json`` holds one complete, consistent run: the old report leaves first,
then the files of the old run that the new one does not write (its ``report.json`` lists them),
and the new report comes in last. A run holds a ``flock`` on its staging folder until it is
published or removed: a new run removes the staging folders no live run holds (a killed run's)
and refuses to write into a folder that a live run is writing into. An older release's staging
folder (named without ``held-``) is never locked, so whether its run is live cannot be told: it is
left, with a :class:`StagingFolderWarning`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

from tiered_store.atomic_file import fsync_dir
from tiered_store.engram import EngramConfig
from tiered_store.errors import ConfigError, TieredStoreError, TierIOError
from tiered_store.process_locks import exclusive_now, open_held, release

from ..report import REPORT_JSON, REPORT_MD

__all__ = [
    "OutputDirError",
    "Staging",
    "StagingFolderWarning",
    "file_sizes",
    "prepare_out_dir",
    "publish",
    "refuse_unknown_table",
    "table_choices",
]


class OutputDirError(TieredStoreError, OSError):
    """The output folder cannot be created or written."""


def table_choices(analysis: str | Path | None) -> tuple[list[str], str]:
    """The tables a bench option may name, and where they come from: those of the finished
    analysis in ``analysis`` (its report's; a ConfigError naming ``--analysis`` when there is no
    such analysis), else those an analysis with the default Engram config makes."""
    if not analysis:
        return [f"layer{layer}" for layer in EngramConfig().layer_ids], "the default Engram config"
    report = Path(analysis) / REPORT_JSON
    try:
        return list(json.loads(report.read_text())["tables"]), f"--analysis {analysis}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = "no report.json" if isinstance(exc, FileNotFoundError) else f"{report}: {exc!r}"
        raise ConfigError(
            f"--analysis {analysis}: {why}; expected the output folder of `tiered-store analyze`"
        ) from None


def refuse_unknown_table(table: str, option: str, choices: tuple[list[str], str]) -> None:
    """A ConfigError naming ``option`` when ``table`` is not one of ``choices``
    (:func:`table_choices`)."""
    tables, where = choices
    if table not in tables:
        raise ConfigError(
            f"{option} {table}: no such table in {where}; expected one of {', '.join(tables)}"
        )


class StagingFolderWarning(UserWarning):
    """An older release's staging folder in the output folder, left: it may be a live run's."""


class Staging(NamedTuple):
    """A run's staging folder, the descriptor that holds its ``flock`` (:func:`release` it once
    the folder is published or removed), the names of killed runs' folders removed and those of
    older releases' folders left (their runs take no lock: they may be live)."""

    path: Path
    lock: int
    removed: list[str]
    left: list[str]


STAGING_PREFIX = ".analyze-staging-"  # every release's; tempfile's random part has no "-"
HELD_PREFIX = STAGING_PREFIX + "held-"  # this release's, whose runs hold a flock on it


def prepare_out_dir(out_dir: Path, name: str = "out_dir") -> Staging:
    """Create ``out_dir`` and a staging folder in it, held by this run; staging folders that no
    live run holds are removed first. Raise OutputDirError naming the problem and the folder as
    ``name`` (the argument, or the option that gave it), or a live run writing into it."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not out_dir.is_dir():
            raise NotADirectoryError(f"{out_dir} is not a directory")
        folder = open_held(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise _unwritable(out_dir, name, exc) from None
    try:
        # one run at a time looks for live runs and makes its own folder (a file system without
        # flock: each run on its own, as before)
        with contextlib.suppress(OSError):
            fcntl.flock(folder, fcntl.LOCK_EX)
        removed, live, left = _remove_abandoned_staging(out_dir)
        if live:
            raise OutputDirError(
                f"{name} {out_dir}: another analyze run is writing into it (its staging folder "
                f"{live[0]} is held); expected one run at a time in an output folder"
            )
        try:
            staging = Path(tempfile.mkdtemp(prefix=HELD_PREFIX, dir=out_dir))
            lock = open_held(staging, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise _unwritable(out_dir, name, exc) from None
        with contextlib.suppress(OSError):  # new: no other run holds it
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return Staging(staging, lock, removed, left)
    finally:
        release(folder)


def _unwritable(out_dir: Path, name: str, exc: OSError) -> OutputDirError:
    """The OutputDirError of an output folder that cannot be created or written."""
    return OutputDirError(
        f"{name} {out_dir}: cannot create or write the output folder "
        f"({exc.strerror or exc}); expected a writable directory"
    )


def _remove_abandoned_staging(out_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """Remove the staging folders in ``out_dir`` that no live run holds (killed runs'); return
    the names removed, those a live run holds and older releases' folders (left: their runs hold
    no lock, so a live one looks killed). One whose lock cannot be taken otherwise (a file system
    without flock) is left alone."""
    removed, live, left = [], [], []
    try:
        entries = sorted(out_dir.iterdir())
    except OSError:  # a folder that cannot be listed: none to remove that a run could see
        return removed, live, left
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        if not entry.name.startswith(HELD_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                left.append(entry.name)
            continue
        try:
            fd = open_held(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # removed meanwhile, a link or not a folder: no run's
            continue
        try:
            if exclusive_now(fd, entry):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
            else:
                live.append(entry.name)
        except TierIOError:  # no flock on this file system
            pass
        finally:
            release(fd)
    if removed:
        fsync_dir(out_dir)
    return removed, live, left


def publish(staging: Path, out_dir: Path) -> None:
    """Move staged outputs into ``out_dir``: the old report first out, then the old run's files
    this run does not replace (a holdout trace, another config's layers), the new report last in."""
    _check_in_the_way(staging, out_dir)  # before anything moves: out_dir is left as it was
    stale = _previous_files(out_dir) - set(file_sizes(staging)) - {REPORT_JSON, REPORT_MD}
    for marker in (REPORT_JSON, REPORT_MD):
        (out_dir / marker).unlink(missing_ok=True)
    root = out_dir.resolve()
    for name in sorted(stale):
        path = out_dir / name
        if path.is_file() and not path.is_symlink() and root in path.resolve().parents:
            path.unlink()
        if path.parent != out_dir:
            with contextlib.suppress(OSError):  # a per-table folder, once empty
                path.parent.rmdir()
    last = {REPORT_MD: 1, REPORT_JSON: 2}  # the report goes in last, report.json at the very end
    entries = sorted(staging.iterdir(), key=lambda p: (last.get(p.name, 0), p.name))
    for entry in entries:
        target = out_dir / entry.name
        if target.is_dir() and not target.is_symlink() and entry.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    fsync_dir(out_dir)  # the renames above are durable once this returns


def _check_in_the_way(staging: Path, out_dir: Path) -> None:
    """Raise OutputDirError naming an output whose place in ``out_dir`` a rename cannot take: a
    folder where a file goes, a file or link where a folder goes."""
    for entry in sorted(staging.iterdir()):
        target = out_dir / entry.name
        if entry.is_dir():
            blocked = os.path.lexists(target) and (target.is_symlink() or not target.is_dir())
            what, expected = "a link" if target.is_symlink() else "a file", "a folder"
        else:
            blocked = target.is_dir() and not target.is_symlink()
            what, expected = "a directory", "a file"
        if blocked:
            raise OutputDirError(
                f"cannot write {target}: {what} is in the way; expected {expected} there (or "
                f"nothing): move it aside and run again; {out_dir} is left as it was"
            )


def _previous_files(out_dir: Path) -> set[str]:
    """The files a previous run's ``report.json`` in ``out_dir`` lists (names inside the folder
    only); none when there is no readable one (a pipe there would wait for a writer for ever)."""
    report = out_dir / REPORT_JSON
    if not report.is_file():  # a pipe, a device, a folder (or a link to one): no earlier report
        return set()
    try:
        files = json.loads(report.read_text()).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    inside = set()
    for name in files if isinstance(files, dict) else ():
        parts = Path(name).parts
        if parts and not Path(name).is_absolute() and ".." not in parts:
            inside.add(str(Path(name)))
    return inside


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under ``folder``: relative name -> size in bytes."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
