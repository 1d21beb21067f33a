"""Reading a text corpus: which files, in which order, and which of them are text.

A :class:`Corpus` is an ordered list of files, one document per file. It comes from paths the
user names (files, directories walked recursively, glob patterns) or, with no paths, from an
embedded default every machine has: the Python standard library's own ``*.py`` files
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages``/``dist-packages``, which differ
from machine to machine).

Files are read as UTF-8 (a byte-order mark is dropped), or as UTF-16 or UTF-32 where one of
their byte-order marks begins the file; a ``*.gz`` file is decompressed first, so
Debian's compressed manual pages and documentation (``/usr/share/man``, ``/usr/share/doc``) are
text too. A file with a NUL byte (past such a mark, a NUL character) is binary, a file
that does not decode is not UTF-8, a file with only whitespace is empty, and a pipe, socket or
device in a folder (or a link to one) is not a regular file: all four are skipped and counted in
:class:`ReadStats`, whose :meth:`ReadStats.warning` names a few of them.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import numbers
import os
import stat
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TieredStoreError
from .integers import as_integer

__all__ = [
    "Corpus",
    "CorpusError",
    "ReadStats",
    "SkippedFilesWarning",
    "corpus_paths",
    "default_corpus",
    "iter_texts",
    "read_text",
    "resolve_corpus",
]

_GLOB_CHARS = frozenset("*?[")
_SKIPPED_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
_BINARY_PROBE = 1 << 16  # bytes searched for a NUL byte before decoding
# byte-order marks of the encodings whose text holds NUL bytes: such a file is text, not binary
# (UTF-32's first: its little-endian mark begins with UTF-16's)
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
EXAMPLES_SHOWN = 5  # skipped files named in the warning
NAMED_ROOTS = 5  # paths a corpus's description names; the rest are counted


class CorpusError(TieredStoreError, ValueError):
    """The corpus is empty, a path does not exist, or nothing in it is readable text."""


class SkippedFilesWarning(UserWarning):
    """Some corpus files were skipped (binary, not UTF-8, empty, or not a regular file)."""


@dataclass(frozen=True)
class Corpus:
    """An ordered list of text files, one document each.

    Attributes
    ----------
    files : tuple of Path
        The documents, in processing order.
    description : str
        What the corpus is, for reports and trace headers.
    roots : tuple of str
        The paths (or patterns) it was built from.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("hello"); _ = (d / "b.txt").write_text("world")
    >>> corpus = resolve_corpus([d])
    >>> [p.name for p in corpus.files]
    ['a.txt', 'b.txt']
    >>> main, held = corpus.split(0.5, seed=0)
    >>> len(main), len(held), set(main.files).isdisjoint(held.files)
    (1, 1, True)
    """

    files: tuple[Path, ...]
    description: str
    roots: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.files)

    def shuffled(self, seed: int) -> Corpus:
        """The same documents in a seeded random order."""
        order = _rng(seed).permutation(len(self.files))
        return Corpus(
            tuple(self.files[i] for i in order), self.description + " (shuffled)", self.roots
        )

    def holdout_mask(self, fraction: float, seed: int) -> np.ndarray:
        """Boolean mask over :attr:`files`: True for the documents of a held-out part.

        ``round(fraction x documents)`` documents (at least 1 and at most all but one) are drawn
        by a seeded permutation, so the two parts are disjoint by document.
        """
        real = isinstance(fraction, numbers.Real) and not isinstance(fraction, bool)
        if not (real and 0.0 < fraction < 1.0):  # a str was a bare TypeError comparing it
            raise CorpusError(f"holdout: got {fraction!r}; expected a fraction in (0, 1)")
        rng = _rng(seed)
        n = len(self.files)
        if n < 2:
            raise CorpusError(
                f"holdout {fraction:g}: corpus {self.description} has {n} document; expected at "
                "least 2 to split by document"
            )
        k = min(max(round(fraction * n), 1), n - 1)
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[:k]] = True
        return mask

    def split(self, fraction: float, seed: int = 0) -> tuple[Corpus, Corpus]:
        """``(rest, held_out)``: disjoint by document, each in the original order."""
        mask = self.holdout_mask(fraction, seed)
        rest = tuple(f for f, m in zip(self.files, mask, strict=True) if not m)
        held = tuple(f for f, m in zip(self.files, mask, strict=True) if m)
        return (
            Corpus(rest, f"{self.description} minus holdout", self.roots),
            Corpus(held, f"{self.description} holdout {fraction:g}", self.roots),
        )

    def total_bytes(self) -> int:
        """Sum of the files' sizes (files that vanished count 0)."""
        total = 0
        for f in self.files:
            with contextlib.suppress(OSError):
                total += f.stat().st_size
        return total


def _rng(seed: object) -> np.random.Generator:
    """The generator of a split or shuffle; a seed that is not an integer >= 0 (None: another
    draw each time) is a CorpusError naming it."""
    number = as_integer(seed)
    if number is None or number < 0:
        raise CorpusError(f"seed: got {seed!r}; expected an integer >= 0")
    return np.random.default_rng(number)


def _walk(directory: Path) -> Iterator[Path]:
    """Files under ``directory``, sorted, skipping hidden entries and cache folders (pipes and
    devices too: :func:`read_text` skips them); links to folders are followed, each folder walked
    once (a link loop ends there). A folder that cannot be listed is yielded itself, for
    :func:`read_text` to name as unreadable."""
    unlisted: list[Path] = []
    for root, files in _folders(directory, unlisted, _SKIPPED_DIRS):
        yield from unlisted
        unlisted.clear()
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name
    yield from unlisted


def _folders(
    directory: str | os.PathLike[str], unlisted: list[Path], skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, list[str]]]:
    """``(folder, file names)`` from ``directory`` down, subfolders by name, leaving out hidden and
    ``skip`` folders; links to folders are followed, each folder once (a link loop ends there).
    The folders it cannot list are appended to ``unlisted`` as it comes to them."""
    walked = {_identity(Path(directory))}
    for root, dirs, files in os.walk(
        directory, onerror=lambda e: unlisted.append(Path(e.filename)), followlinks=True
    ):
        kept = []
        for d in sorted(dirs):
            if d.startswith(".") or d in skip:
                continue
            identity = _identity(Path(root) / d)
            if identity is not None and identity not in walked:
                walked.add(identity)
                kept.append(d)
        dirs[:] = kept
        yield root, files


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` names, through links: one file or folder, however many
    names it has (hard links, symbolic links); None when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_key(path: Path) -> object:
    """What makes two names one file: its identity, else (a broken or looping link) the path it
    resolves to; os.path.realpath, as Path.resolve raises RuntimeError on a link loop."""
    return _identity(path) or Path(os.path.realpath(path))


def _expand(path: str | os.PathLike[str]) -> list[Path]:
    """The files one corpus argument names (a file, a directory, or a glob pattern)."""
    from .config import expand_home  # (not at import: the corpus reader stays light)

    text = os.fspath(path)
    p = Path(expand_home(text))  # (Path("./~").expanduser() is the home folder)
    if p.is_dir():
        return list(_walk(p))
    if p.is_file():
        return [p]
    if p.exists():  # a pipe (``<(cmd)``), socket or device: reading it may never end
        raise CorpusError(
            f"corpus path {text!r}: not a regular file or directory; expected text files, "
            "directories holding them, or glob patterns"
        )
    if _GLOB_CHARS & set(text):
        out: list[Path] = []
        unlisted: list[Path] = []
        for match in sorted(_glob(expand_home(text), unlisted)):
            m = Path(match)
            out.extend(_walk(m) if m.is_dir() else [m] if m.is_file() else [])
        out.extend(unlisted)
        if not out:
            raise CorpusError(f"corpus path {text!r}: the pattern matches no files")
        return out
    if p.is_symlink():  # ``ls`` shows it: "no such file" would not say why
        raise CorpusError(
            f"corpus path {text!r}: a link to {os.readlink(p)!r} that resolves to no file (its "
            "target is missing, or links loop); expected a file, a directory or a glob pattern"
        )
    raise CorpusError(f"corpus path {text!r}: no such file or directory")


def _glob(pattern: str, unlisted: list[Path]) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, but a ``**`` descends into each folder once (glob
    goes round a link loop up to the system's limit of links in a path: with two links to a
    parent folder, 2^40 paths) and appends to ``unlisted`` the folders it cannot list (which
    glob leaves out without a word), for :func:`read_text` to name as unreadable."""
    parts = Path(pattern).parts
    if "**" not in parts:
        return glob.glob(pattern)
    at = parts.index("**")
    head, rest = (os.path.join(*parts[:at]) if at else os.curdir), parts[at + 1 :]
    roots = glob.glob(head) if _GLOB_CHARS & set(head) else [head]
    folders_only = pattern.endswith(os.sep)  # as glob: a pattern ending in / matches folders
    out: list[str] = []
    for root in filter(os.path.isdir, roots):  # none: the pattern matches nothing (an error)
        for folder, files in _folders(root, unlisted):  # hidden folders left out, as by glob
            if rest:  # the part after ** in each folder (another ** walks on from there)
                below = os.path.join(glob.escape(folder), *rest) + os.sep * folders_only
                out += _glob(below, unlisted)
            else:  # a trailing **: every folder and file below, as glob
                out.append(folder)
                out += (
                    [] if folders_only else [os.path.join(folder, f) for f in files if f[0] != "."]
                )
    return out


def corpus_paths(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None,
) -> list[str | os.PathLike[str]]:
    """``paths`` as a list: one str or PathLike is one path, not the characters of its name."""
    if paths is None:
        out: list = []
    elif isinstance(paths, (str, bytes, os.PathLike)) or not isinstance(paths, Iterable):
        out = [paths]  # a lone number is named below, not read as no paths (0) or iterated (3)
    else:
        out = list(paths)
    for path in out:
        if not isinstance(path, (str, os.PathLike)):  # bytes: not walked as numbers
            raise CorpusError(
                f"corpus path {path!r}: a {type(path).__name__}; expected a str or Path (a file, "
                "a directory or a glob pattern) or a list of them"
            )
        if os.fspath(path) == "":  # Path("") is ".": every file under the current folder
            raise CorpusError(
                "corpus path '': empty; expected a file, a directory or a glob pattern (no "
                "paths at all: the default corpus)"
            )
    return out


def resolve_corpus(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
    *,
    exclude: str | os.PathLike[str] | None = None,
    exclude_name: str | None = None,
) -> Corpus:
    """The corpus that ``paths`` name, or :func:`default_corpus` when there are none.

    Parameters
    ----------
    paths : str, Path or an iterable of them, optional
        Files, directories (walked recursively in sorted order, hidden entries, ``__pycache__``,
        ``site-packages`` and ``dist-packages`` skipped) and glob patterns (``**`` recurses).
        A file named twice (or under two names: links) is kept once, at its first place;
        links to folders are walked, each folder once.
    exclude : str or Path, optional
        A folder whose files are never part of the corpus (``analyze``'s ``--out``: a previous
        run's reports are not text to analyse).
    exclude_name : str, optional
        What ``exclude`` is to the caller, for the error when it holds every file found (the
        command's option: ``"analyze's --out"``, ``"train's --out"``).

    Returns
    -------
    Corpus

    Raises
    ------
    CorpusError
        A path does not exist, a pattern matches nothing, or no file is found at all (or only
        files in ``exclude``, which the error names).

    Examples
    --------
    >>> resolve_corpus().description.startswith("Python standard library")
    True
    """
    paths = corpus_paths(paths)
    if not paths:
        return default_corpus()
    seen: set[object] = set()  # a file by (device, inode): one document whatever its names
    excluded: set[object] = set()
    if exclude is not None and Path(exclude).is_dir():  # its files are never added
        excluded.update(_file_key(f) for f in _walk(Path(exclude)))
    files: list[Path] = []
    left_out: set[object] = set()  # files found in the excluded folder
    for arg in paths:
        for f in _expand(arg):
            key = _file_key(f)
            if key in excluded:
                left_out.add(key)
            elif key not in seen:
                seen.add(key)
                files.append(f)
    if not files:
        raise CorpusError(
            f"corpus {', '.join(map(os.fspath, paths))}: "
            + (
                f"every file found ({len(left_out):,}) is in the excluded folder "
                f"{os.fspath(exclude)} ({f'{exclude_name}, ' if exclude_name else ''}never read "
                "as text); expected an output folder that does not hold the corpus"
                if left_out
                else "no files found; expected text files, directories holding them, or glob "
                "patterns"
            )
        )
    roots = tuple(os.fspath(p) for p in paths)
    named = ", ".join(roots[:NAMED_ROOTS])  # a shell-expanded glob: thousands of paths
    if len(roots) > NAMED_ROOTS:
        named += f" and {len(roots) - NAMED_ROOTS:,} more paths"
    files_text = f"{len(files):,} file{'s' * (len(files) != 1)}"
    return Corpus(tuple(files), f"{files_text} from {named}", roots)


def default_corpus() -> Corpus:
    """The Python standard library's ``*.py`` source files (without third-party packages).

    Every Python installation has them, so ``tiered-store analyze`` runs without downloads: about
    1,800 files, 31 MB and 8.7M DeepSeek tokens on CPython 3.11.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in _walk(stdlib) if p.suffix == ".py"]
    if not files:
        raise CorpusError(f"default corpus: no *.py files under the standard library {stdlib}")
    return Corpus(
        tuple(files),
        f"Python standard library {sysconfig.get_python_version()} sources "
        f"({len(files):,} *.py files)",
        (str(stdlib),),
    )


@dataclass
class ReadStats:
    """What reading a corpus found: documents used and files skipped, with reasons."""

    documents: int = 0
    bytes_read: int = 0
    skipped: dict[str, list[str]] = field(
        default_factory=lambda: {
            "binary": [],
            "not UTF-8": [],
            "empty": [],
            "not a regular file": [],
            "unreadable": [],
        }
    )

    @property
    def skipped_count(self) -> int:
        """Files skipped, all reasons together."""
        return sum(len(v) for v in self.skipped.values())

    def skip(self, path: Path, reason: str) -> None:
        """Record a skipped file."""
        self.skipped.setdefault(reason, []).append(str(path))

    def warning(self, limit: int = EXAMPLES_SHOWN) -> str | None:
        """One line naming the skipped files (a count, then the first few), or None."""
        n = self.skipped_count
        if not n:
            return None
        reasons = ", ".join(f"{len(v)} {k}" for k, v in self.skipped.items() if v)
        names = [f"{p} ({k})" for k, v in self.skipped.items() for p in v][:limit]
        more = f", and {n - len(names)} more" if n > len(names) else ""
        return f"skipped {n} file{'s' * (n != 1)} ({reasons}): {', '.join(names)}{more}"

    def to_dict(self, limit: int = 50) -> dict[str, object]:
        """JSON form: counts per reason and up to ``limit`` names per reason."""
        return {
            "documents": self.documents,
            "bytes_read": self.bytes_read,
            "skipped": self.skipped_count,
            "skipped_by_reason": {k: len(v) for k, v in self.skipped.items()},
            "skipped_files": {k: v[:limit] for k, v in self.skipped.items() if v},
        }


def read_text(path: Path) -> tuple[str | None, str | None, int]:
    """``(text, None, size)`` for a text file (UTF-8; UTF-16 or UTF-32 with a byte-order mark),
    else ``(None, reason, size)``.

    Reasons: ``"binary"`` (a NUL byte in the first 64 KiB; past a UTF-16 or UTF-32 byte-order
    mark, a NUL character there or bytes that do not decode by it), ``"not UTF-8"``, ``"empty"``
    (nothing but whitespace), ``"not a regular file"`` (a pipe, socket or device, or a link to
    one: never opened, as its read may wait for a writer or never end) and ``"unreadable"`` (an
    OS error, a ``*.gz`` file that does not decompress, or a folder that could not be listed). A
    ``*.gz`` file is decompressed first; ``size`` is its decompressed size. Of a binary file (a
    ``*.gz`` one too) only the first 64 KiB are read or decompressed (and counted in ``size``).

    Examples
    --------
    >>> import gzip, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "page.1.gz"
    >>> _ = p.write_bytes(gzip.compress("Grüße".encode()))
    >>> read_text(p)
    ('Grüße', None, 7)
    """
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):  # a folder of the corpus that could not be listed
            return None, "unreadable", 0
        if not stat.S_ISREG(mode):
            return None, "not a regular file", 0
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:  # a binary file is read no further than its probe
            data = f.read(_BINARY_PROBE)
            encoding = next((e for bom, e in _WIDE_BOMS if data.startswith(bom)), None)
            binary = _binary(data, encoding)
            if not binary:
                f.seek(0)  # one buffer of the whole text (a *.gz one rewinds and decompresses)
                data = f.read()
    except (OSError, EOFError, zlib.error):
        return None, "unreadable", 0
    if binary:
        return None, "binary", len(data)
    text = None
    if encoding is not None:  # else, not what its mark says: binary, as any file with a NUL
        with contextlib.suppress(UnicodeDecodeError):
            text = data.decode(encoding)
    if text is None and b"\x00" in data[:_BINARY_PROBE]:
        return None, "binary", len(data)
    try:
        text = data.decode("utf-8-sig") if text is None else text
    except UnicodeDecodeError:
        return None, "not UTF-8", len(data)
    if not text.strip():
        return None, "empty", len(data)
    return text, None, len(data)


def _binary(probe: bytes, encoding: str | None) -> bool:
    """Whether a file's first bytes say binary: a NUL byte; where a UTF-16 or UTF-32 byte-order
    mark (``encoding``) begins them, a NUL character or bytes that do not decode by it."""
    if encoding is None:
        return b"\x00" in probe
    try:  # a code unit cut at the probe's end waits (final=False): not an error
        return "\x00" in codecs.getincrementaldecoder(encoding)().decode(probe)
    except UnicodeDecodeError:
        return True


def iter_texts(
    files: Sequence[Path], stats: ReadStats, wanted: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, str]]:
    """``(index, text)`` of each readable file, in order; skipped files are recorded in
    ``stats``. When ``wanted(i)`` is False (asked just before reading) file i is passed over."""
    for i, path in enumerate(files):
        if wanted is not None and not wanted(i):
            continue
        text, reason, size = read_text(path)
        if text is None:
            stats.skip(path, reason or "unreadable")
            continue
        stats.documents += 1
        stats.bytes_read += size
        yield i, text
