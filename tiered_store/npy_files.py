"""Reading ``.npy``/``.npz`` files from many threads: numpy's header parser, one thread at a time.

numpy parses a ``.npy`` header with ``ast.literal_eval``. On CPython 3.11 the AST builder keeps
its recursion depth in state shared by every thread; a garbage collection inside it can run
another thread's ``literal_eval`` in between, and then one of them fails with ``SystemError: AST
constructor recursion depth mismatch`` (cpython#106905 is one cause). Serving opens tables in
reload, scrub and request threads at once, so every header the library reads is parsed under
:data:`npy_header_lock`. The lock is held for the header only: whole arrays are copied after it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import tokenize
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from .atomic_file import special_file

__all__ = ["load_npy", "npy_header_lock", "read_npy_header"]

npy_header_lock = threading.RLock()
"""Held while numpy parses an ``.npy`` header (hold it, too, while reading an ``.npz``'s members)."""


def read_npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """``(shape, fortran_order, dtype)`` of the open ``.npy`` file ``f``, left at its data."""
    with npy_header_lock, _header_errors_as_value_errors():
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    raise ValueError(
        f"unsupported .npy format version {version[0]}.{version[1]}; expected 1.0 or 2.0"
    )


@contextlib.contextmanager
def _header_errors_as_value_errors() -> Iterator[None]:
    """A garbled header's parse errors (numpy raises ``tokenize.TokenError`` for unbalanced
    brackets) as the ``ValueError`` every caller handles."""
    try:
        yield
    except (SyntaxError, tokenize.TokenError) as exc:
        raise ValueError(f"its header does not parse ({type(exc).__name__}: {exc})") from None


def load_npy(path: str | os.PathLike[str], *, mmap_mode: str | None = None) -> Any:
    """``np.load(path, mmap_mode=mmap_mode, allow_pickle=False)``, its header parsed under
    :data:`npy_header_lock`.

    An ``.npy`` read whole is memory-mapped under the lock and copied after it; an ``.npz`` is
    returned open (read its members under the lock). An empty or cut-off file is the
    ``ValueError`` every caller handles, as is a FIFO, device or socket at ``path`` (an open of a
    FIFO waits for a writer forever).
    """
    if (kind := special_file(path)) is not None:
        raise ValueError(f"it is {kind}; expected an .npy or .npz file")
    with npy_header_lock, _header_errors_as_value_errors():
        try:
            loaded = np.load(path, mmap_mode=mmap_mode or "r", allow_pickle=False)
        except (EOFError, zipfile.BadZipFile) as exc:  # an empty file; a cut-off .npz
            raise ValueError(f"empty or cut off ({exc})") from None
    if mmap_mode is None and isinstance(loaded, np.memmap):
        return np.array(loaded)
    return loaded
