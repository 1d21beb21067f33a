"""Where ``analyze`` writes: a staging folder inside the output folder, moved into place at the end.

A folder with a ``report.json`` holds one complete, consistent run: the old report leaves first,
then the files of the old run that the new one does not write (its ``report.json`` lists them),
and the new report comes in last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tiered_store.atomic_file import fsync_dir
from tiered_store.engram import EngramConfig
from tiered_store.errors import ConfigError, TieredStoreError

from ..report import REPORT_JSON, REPORT_MD

__all__ = [
    "OutputDirError",
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


def prepare_out_dir(out_dir: Path, name: str = "out_dir") -> Path:
    """Create ``out_dir`` and a staging folder in it; raise OutputDirError naming the problem and
    the folder as ``name`` (the argument, or the option that gave it)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not out_dir.is_dir():
            raise NotADirectoryError(f"{out_dir} is not a directory")
        return Path(tempfile.mkdtemp(prefix=".analyze-staging-", dir=out_dir))
    except OSError as exc:
        raise OutputDirError(
            f"{name} {out_dir}: cannot create or write the output folder "
            f"({exc.strerror or exc}); expected a writable directory"
        ) from None


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
