"""Where ``analyze`` writes: a staging folder inside the output folder, moved into place at the end.

A folder with a ``report.json`` holds one complete, consistent run: the old report leaves first,
the new one comes in last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tiered_store.atomic_file import fsync_dir
from tiered_store.errors import TieredStoreError

from ..report import REPORT_JSON, REPORT_MD

__all__ = ["OutputDirError", "file_sizes", "prepare_out_dir", "publish"]


class OutputDirError(TieredStoreError, OSError):
    """The output folder cannot be created or written."""


def prepare_out_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` and a staging folder in it; raise OutputDirError naming the problem."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not out_dir.is_dir():
            raise NotADirectoryError(f"{out_dir} is not a directory")
        return Path(tempfile.mkdtemp(prefix=".analyze-staging-", dir=out_dir))
    except OSError as exc:
        raise OutputDirError(
            f"--out {out_dir}: cannot create or write the output folder "
            f"({exc.strerror or exc}); expected a writable directory"
        ) from None


def publish(staging: Path, out_dir: Path) -> None:
    """Move staged outputs into ``out_dir``: the old report first out, the new one last in."""
    for marker in (REPORT_JSON, REPORT_MD):
        (out_dir / marker).unlink(missing_ok=True)
    last = {REPORT_MD: 1, REPORT_JSON: 2}  # the report goes in last, report.json at the very end
    entries = sorted(staging.iterdir(), key=lambda p: (last.get(p.name, 0), p.name))
    for entry in entries:
        target = out_dir / entry.name
        if target.is_dir() and not target.is_symlink() and entry.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    fsync_dir(out_dir)  # the renames above are durable once this returns


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under ``folder``: relative name -> size in bytes."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
