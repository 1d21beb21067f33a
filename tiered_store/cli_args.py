"""Shared by the command line and the bench scripts: argparse types that refuse bad values by
name, library errors named by their option, and the command line a report records."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import select
import signal
import stat
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .atomic_file import what_is
from .capacity import CAPACITY_HELP, MAX_ROWS, check_capacity_spec, check_share, format_bytes
from .config import check_device, expand_home
from .errors import ConfigError, TieredStoreError, error_text, shown


def at_least(
    minimum: int, what: str | None = None, *, bounded: bool = True
) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``; anything else is refused with the value,
    as ``expected WHAT, got 'TEXT'`` (``what``: by default ``an integer >= MINIMUM``); one past
    2**63-1 (what NumPy and torch take as a count or a seed) as too large, unless not
    ``bounded`` (a value the command checks itself, such as a seed of up to 2**64-1: one of
    more digits than ``int()`` reads is still too large).

    >>> parser = argparse.ArgumentParser(prog="bench")
    >>> _ = parser.add_argument("--rounds", type=at_least(1))
    >>> parser.parse_args(["--rounds", "3"]).rounds
    3
    >>> at_least(1)("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected an integer >= 1, got '0'
    >>> at_least(0, "0 (skip) or a positive number of rows")("1.5")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected 0 (skip) or a positive number of rows, got '1.5'
    """
    expected = f"an integer >= {minimum}" if what is None else what

    def parse(text: str) -> int:
        digits = text.strip().removeprefix("+")  # (int() reads 4,300 digits, zeros counted)
        try:
            value = int(text)
        except ValueError:
            value = None
        too_large = False
        if digits.isascii() and digits.isdigit():
            digits = digits.lstrip("0") or "0"
            # past int64 ('9' * 5000 too), whatever int() made of it; unbounded: as written
            too_large = len(digits) > (19 if bounded else 4000)
            value = None if too_large else int(digits)
        if too_large or (bounded and value is not None and value > MAX_ROWS):
            bound = f", at most {MAX_ROWS:,} (2**63-1)" if bounded else ""
            raise argparse.ArgumentTypeError(
                f"too large: expected {expected}{bound}, got {shown(text)}"
            )
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {shown(text)}")
        return value

    return parse


def run_script(main: Callable[[], Any], name: str | None = None) -> int:
    """The exit status of a command (a bench script, a ``tiered-store`` command): ``main()``'s
    (an int; None: 0; anything else: 0 when true, 1 when false); 2 with one line, ``NAME: error:
    ...``, when the library refuses something (a missing analysis, a bad setting) instead of a
    traceback; 130 when interrupted (Ctrl-C, or SIGTERM, which unwinds the same way so cleanup
    runs); 141, as a process SIGPIPE kills, without a word, when the reader of its stdout or
    stderr stopped reading (``| head -1``, ``2>&1 | head -1``; another pipe of its own broken,
    a worker's, is an error as any other). ``name``: the script's file
    name unless given. With no stdout (``>&-``), what would go there is dropped, as print
    drops it. With no stderr (closed: ``2>&-``), what would go there is dropped:
    ``print(file=sys.stderr)`` would print it on stdout, into the report a script prints there."""
    script = name or os.path.basename(sys.argv[0]) or "bench"
    if sys.stderr is None:  # Python's stderr when its file descriptor 2 is closed
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
    try:
        try:
            with interrupt_on_sigterm():  # so cleanup runs: no work folder or half a file left
                code = main()
            if sys.stdout is not None:  # (None: its descriptor 1 closed, what print drops)
                sys.stdout.flush()  # a closed pipe shows here, not as an error at exit
        except TieredStoreError as exc:
            print(f"{script}: error: {error_text(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    except BrokenPipeError:  # the reader stopped reading: no error to report, nor any more output
        left = [s for s in (sys.stdout, sys.stderr) if _reader_left(s)]
        if not left:  # one of its own pipes (a worker's, a connection): an error, as any other
            raise
        for stream in left:  # to nowhere, not an error at exit (the other, a file or a
            with contextlib.suppress(OSError, ValueError):  # terminal, keeps what it holds)
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        return 141
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    return 0 if code is None or code else 1


def _reader_left(stream: Any) -> bool:
    """Whether the reader of ``stream`` (stdout, stderr) stopped reading: what it holds cannot be
    flushed, or its pipe or socket has no reader left (poll's POLLERR or POLLHUP; one written
    to by print may hold nothing to flush)."""
    try:
        stream.flush()
        poll = select.poll()
        poll.register(stream.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except BrokenPipeError:
        return True
    except (OSError, ValueError, AttributeError):  # closed, or without a descriptor (captured)
        return False


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (so cleanup code runs), as SIGINT does
    (only a main thread can take signals: elsewhere, nothing changes)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def given_path(text: str) -> Path:
    """An argparse ``type``: a path, any; an empty one (an unset shell variable) is refused
    rather than taken as the current folder, as ``Path("")`` is. A leading ``~`` is the home
    folder, as in a shell and in the store configs (quoted, or from a variable, the shell leaves
    it; with HOME set but empty, refused: :func:`~tiered_store.config.expand_home`); every path
    type here reads its path with this. A folder named ``~`` here, ``./~``, is
    that folder, absolute (as ``Path("~")``, without the ``./``, the config loaders read it as
    the home folder).

    >>> given_path("~/t.npy") == Path.home() / "t.npy"
    True
    >>> given_path("./~/t.npy") == Path.cwd() / "~" / "t.npy"
    True
    >>> given_path("")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: got ''; expected a path
    """
    if not text:
        raise argparse.ArgumentTypeError("got ''; expected a path")
    try:
        path = Path(expand_home(text))
    except ConfigError as exc:  # HOME set but empty
        raise argparse.ArgumentTypeError(str(exc)) from None
    if str(path).startswith("~") and not text.startswith("~"):  # './~': pathlib drops the './'
        return path.absolute()
    return path


def existing_file(text: str) -> Path:
    """An argparse ``type``: a file that exists (a table, a trace to reuse).

    >>> existing_file("/nonexistent.npy")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '/nonexistent.npy' does not exist; expected an existing file
    """
    path = given_path(text)
    if not path.is_file():
        what = (
            "is a directory"
            if path.is_dir()
            else f"is {what_is(path)}"
            if path.exists()  # a FIFO or device was said not to exist
            else "does not exist"
        )
        raise argparse.ArgumentTypeError(f"{text!r} {what}; expected an existing file")
    return path


def existing_dir(text: str) -> Path:
    """An argparse ``type``: a folder that exists (where a script makes its work folder).

    >>> existing_dir("/nonexistent")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '/nonexistent' does not exist; expected an existing folder
    """
    path = given_path(text)
    if not path.is_dir():
        what = f"is {what_is(path)}" if path.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text!r} {what}; expected an existing folder")
    return path


def add_table_dir(parser: ArgumentParser) -> None:
    """``--dir``: the folder a bench script makes its scratch table's temporary folder in."""
    parser.add_argument(
        "--dir",
        type=existing_dir,
        help="where the temporary folder of the table goes (deleted at the end; default: the "
        "system's temporary directory)",
    )


def wrote(path: Path) -> Path:
    """Say on stderr where a script wrote a file, ``wrote PATH`` (its stdout may be the report
    itself); returns ``path``."""
    print(f"wrote {path}", file=sys.stderr, flush=True)
    return path


def say_kept(tables: Iterable[Path]) -> None:
    """Say on stderr in which folders a script keeps the tables it made for its next runs and how
    large the folders are (the tables and all beside them), so that the space can be reclaimed."""
    folders = sorted({t.parent for t in tables})
    size = sum(_files_bytes(d) for d in folders)
    print(
        f"tables kept in {', '.join(map(str, folders))} "
        f"({format_bytes(size)}; reused by the next run with the same sizes, delete them to "
        "reclaim the space)",
        file=sys.stderr,
    )


def _files_bytes(folder: Path) -> int:
    """The bytes of the files in ``folder`` and its subfolders, as deleting it frees them: links
    are not followed (a link to a table elsewhere is not its size), and files removed meanwhile
    (another run's temporary files) are skipped."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                info = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def _not_stdout(text: str, expected: str) -> None:
    """Refuse ``-`` as an output's name: elsewhere it means standard output, here it would make
    a file or folder named ``-`` (a command's report goes to standard output already)."""
    if text == "-":
        raise argparse.ArgumentTypeError(
            f"'-' here would be a path named '-', not standard output; expected {expected} "
            "('./-' for one named '-'; what a command prints goes to standard output already)"
        )


def output_file(text: str) -> Path:
    """An argparse ``type``: a file to write when the work is done, checked before it starts, in
    a folder that is there: a missing folder is refused by name, as a typo's would be (not made,
    with every missing folder above it: the rule of :func:`output_folder`), and so are ``-``
    (standard output elsewhere: :func:`_not_stdout`), a directory there or a folder's name (``results/``, ``results/.``), a device, FIFO or socket there
    (``/dev/null``: the write's rename would replace it), a file where a folder on its way
    should be, or a folder where nothing can be written. A file there is replaced when written
    (renamed over, as every file the library writes), and so is a symbolic link there: the link,
    its target left as it was.

    >>> output_file("run.json").name
    'run.json'
    >>> output_file("/")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '/' is a directory; expected a file to write (or nothing there)
    >>> output_file("/nonexistent/run.json")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '/nonexistent/run.json': '/nonexistent' does not exist; expected a file in an existing folder
    >>> output_file("/proc/run.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '/proc/run.json': cannot write in '/proc' (...); expected a writable folder
    >>> output_file("-")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '-' here would be a path named '-', not standard output; expected a file to write ...
    """
    _not_stdout(text, "a file to write")
    path = given_path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text!r} is a directory; expected a file to write (or nothing there)"
        )
    # Path drops a last '/' or '/.': a file of the folder's name was written ('..' names a folder)
    name = os.path.basename(text)
    if name in ("", ".", ".."):
        raise argparse.ArgumentTypeError(
            f"{text!r} ends in {os.sep + name!r}, a folder's name; expected a file to write"
        )
    if path.exists() and not path.is_file():  # the write's rename would replace it
        raise argparse.ArgumentTypeError(
            f"{text!r} is {what_is(path)}; expected a file to write (or nothing there)"
        )
    if _first_missing(text, path) != path:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {str(path.parent)!r} does not exist; expected a file in an existing folder"
        )
    _check_can_make(str(path), path)  # (~ read as the home folder)
    return path


def output_table(text: str) -> Path:
    """An argparse ``type``: a table a command writes (``NAME.npy``, or ``NAME``): a folder there
    is left to the command, whose error names the tables in it; ``-`` and a folder's name
    (``tabs/``: ``tabs.npy`` was made) are refused, and the table's ``.npy`` file is checked as
    :func:`output_file` checks a file.

    >>> output_table("/tmp/new/")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '/tmp/new/' ends in '/', a folder's name; expected a table file to write (NAME.npy)
    """
    _not_stdout(text, "a table file to write (NAME.npy)")
    path = given_path(text)
    if path.is_dir():
        return path
    name = os.path.basename(text)
    if name in ("", ".", ".."):
        raise argparse.ArgumentTypeError(
            f"{text!r} ends in {os.sep + name!r}, a folder's name; expected a table file to write "
            "(NAME.npy)"
        )
    from .table_format import table_paths  # (not at import: --help stays light)

    output_file(str(table_paths(path)[0]))
    return path


def path_template(text: str) -> str:
    """An argparse ``type``: a path template (``shard --out``, ``unshard --shards``, with
    ``{rank}``), a leading ``~`` the home folder as in every path given (:func:`given_path`: a
    quoted ``'~/s{rank}'`` named a folder ``~`` here) and a folder ``~`` here, ``./~``, made
    absolute, as it reads them; its text is kept otherwise (a last ``/`` is the command's to check).

    >>> path_template("~/s{rank}") == str(Path.home() / "s{rank}")
    True
    >>> path_template("./~/s{rank}") == str(Path.cwd() / "~" / "s{rank}")
    True
    """
    path = given_path(text)  # '' refused, and '~' with HOME set but empty
    expanded = expand_home(text)
    if path.is_absolute() and not os.path.isabs(expanded):  # './~': pathlib drops the './'
        return os.path.join(os.getcwd(), os.path.normpath(expanded)) + text[len(text.rstrip("/")) :]
    return expanded


def _first_missing(text: str, path: Path) -> Path:
    """What writing ``path`` (given as ``text``) makes first: ``path`` itself, or the highest
    missing folder on its way; a broken symbolic link or a file on the way is refused by name."""
    for first, parent in zip((path, *path.parents), path.parents, strict=False):
        if parent.is_symlink() and not parent.exists():  # mkdir(exist_ok=True) fails on it
            raise argparse.ArgumentTypeError(
                f"{text!r}: {str(parent)!r} is a broken symbolic link; expected a folder on the way"
            )
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(
                    f"{text!r}: {str(parent)!r} is {what_is(parent)}; expected a folder on the way"
                )
            return first
    return path


def _check_can_make(text: str, first: Path) -> None:
    """Make and remove a folder of a new temporary name beside what writing the file ``text``
    makes first, ``first`` (a missing folder, or the file), so that a place where nothing can be
    made is refused by name now, not with an OSError once the work is done. Never ``first``
    itself: another run may make it meanwhile, or have made it and be about to write in it."""
    is_file = first == Path(text)
    probe = first.with_name(f".{first.name}.{uuid.uuid4().hex[:12]}.probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        where = f"write in {str(first.parent)!r}" if is_file else f"make {str(first)!r}"
        raise argparse.ArgumentTypeError(
            f"{text!r}: cannot {where} ({exc.strerror or exc}); expected a writable folder"
        ) from None


def folder(text: str) -> Path:
    """An argparse ``type``: a folder that is there, or that can be made (it is made when written
    to): a file there or on its way, or a place where nothing can be made, is refused.

    >>> folder("/") == Path("/")
    True
    >>> folder("/dev/null")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '/dev/null' is a character device; expected a folder (or nothing there)
    """
    path = given_path(text)
    if not path.is_dir():
        if path.is_symlink() and not path.exists():  # mkdir(exist_ok=True) fails on it
            raise argparse.ArgumentTypeError(
                f"{text!r} is a broken symbolic link; expected a folder (or nothing there)"
            )
        if path.exists():
            raise argparse.ArgumentTypeError(
                f"{text!r} is {what_is(path)}; expected a folder (or nothing there)"
            )
        _check_can_make(str(path), _first_missing(text, path))  # (another run may make it)
    return path


def output_folder(text: str) -> Path:
    """An argparse ``type``: a folder a command writes in (``--out``, ``--workdir``, a script's
    ``--dir``), there or new in a folder that is there (the command makes it, and says so:
    :func:`saying_made`); a missing parent is refused, as a typo's would be (not made, with every
    missing folder above it), ``-`` (:func:`_not_stdout`), and whatever :func:`folder` refuses. A leading ``~`` is the home
    folder, as in the store configs that name the tables made there (a folder named ``~`` made
    here was read as the home folder by them): :func:`given_path`.

    >>> output_folder("/") == Path("/")
    True
    >>> output_folder("~") == Path.home()
    True
    >>> output_folder("/nonexistent/tables")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '/nonexistent/tables': '/nonexistent' does not exist; expected an existing folder, or a new one in an existing folder
    """
    _not_stdout(text, "a folder to write in")
    path = folder(text)
    if not path.is_dir() and not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text!r}: {str(path.parent)!r} does not exist; expected an existing folder, or a "
            "new one in an existing folder"
        )
    return path


@contextlib.contextmanager
def saying_made(path: Path, option: str) -> Iterator[bool]:
    """Within the block a command may make the folder ``path`` given as ``option`` (an
    :func:`output_folder`); when it is there after the block and was not before, say so on
    stderr: ``OPTION: created 'PATH'``. The block gets whether it was not there before (made
    in it: one to remove when the work fails)."""
    new = not path.is_dir()
    try:
        yield new
    finally:
        if new and path.is_dir():
            print(f"{option}: created {str(path)!r}", file=sys.stderr)


def make_folder(path: Path, option: str) -> None:
    """Make the folder ``path`` given as ``option`` (an :func:`output_folder`) when it is not
    there, saying so on stderr; one it cannot make (no permission) is a ``ConfigError`` naming
    it."""
    from .atomic_file import make_named_dir  # (not at import: --help stays light)

    with saying_made(path, option):
        make_named_dir(path, option, "a folder it can make and write")


#: how a number past the largest float (read as inf) is refused
_MOST_FLOAT = f"at most {sys.float_info.max!r} (the largest float)"


def positive_number(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (seconds, a rate).

    >>> positive_number("0.5")
    0.5
    >>> positive_number("-1")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a number > 0, got '-1'
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value == math.inf:  # '1e400' too: not 'expected a number > 0'
        raise argparse.ArgumentTypeError(
            f"too large: expected a number > 0, {_MOST_FLOAT}, got {shown(text)}"
        )
    if not value > 0.0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {shown(text)}")
    return value


def fraction(what: str | None = None, *, below_one: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a number F with 0 < F <= 1 (a share, a sampling rate), or F < 1 with
    ``below_one`` (a held-out share, which leaves something on the other side); anything else,
    NaN included, is refused with the value, as ``expected WHAT, got 'TEXT'``.

    >>> fraction()("0.25")
    0.25
    >>> fraction()("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a number in (0, 1], got '0'
    >>> fraction("a share of the rows in (0, 1]")("nan")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a share of the rows in (0, 1], got 'nan'
    >>> fraction(below_one=True)("1")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a number in (0, 1), got '1'
    """
    expected = what or ("a number in (0, 1)" if below_one else "a number in (0, 1]")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0.0 < value < 1.0 if below_one else 0.0 < value <= 1.0):  # NaN too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {shown(text)}")
        return value

    return parse


def capacity(text: str) -> int | str:
    """An argparse ``type``: a tier capacity as a config's ``capacity`` takes it, a row count
    (digits: an int), a byte size or a percentage; anything else is refused with the value.

    >>> capacity("1000"), capacity("5%"), capacity("64MiB")
    (1000, '5%', '64MiB')
    >>> capacity("lots")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a row count (int), a byte size like '512MiB' or '2GiB', or a percentage like '10%', got 'lots'
    >>> capacity("200%")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '200%' is more than 100% of the table; expected 0%..100%
    """
    digits = text.strip()
    spec: int | str = text
    if digits.isascii() and digits.isdigit():  # '²' is a digit to str.isdigit, not to int()
        if len(digits.lstrip("0")) > len(str(MAX_ROWS)):  # int() refused 4,300 digits
            raise argparse.ArgumentTypeError(
                f"got {shown(text)}; expected a row count of at most {MAX_ROWS:,}"
            )
        spec = int(digits.lstrip("0") or "0")  # (int() counts leading zeros too)
    try:
        check_share(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    try:
        return check_capacity_spec(spec)
    except ValueError as exc:
        if isinstance(spec, int):  # a row count past MAX_ROWS: its bound said
            raise argparse.ArgumentTypeError(str(exc)) from None
        raise argparse.ArgumentTypeError(f"expected {CAPACITY_HELP}, got {shown(text)}") from None


def device_name(text: str) -> str:
    """An argparse ``type``: a compute device name as a config's ``device`` takes it.

    >>> device_name("cuda:1")
    'cuda:1'
    >>> device_name("gpu")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: got 'gpu'; expected 'cpu', 'cuda' or 'cuda:N'
    """
    try:
        return check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def policy(text: str) -> str:
    """An argparse ``type``: a tier policy spec as a config's ``policy`` takes it.

    >>> policy("static+lru")
    'static+lru'
    >>> policy("lur")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    argparse.ArgumentTypeError: unknown policy 'lur' in 'lur'; did you mean 'lru'? expected ...
    """
    from policies import PolicySpec  # at parse time: --help need not import the policies
    from policies.errors import PolicyError

    try:
        PolicySpec.parse(text)
    except PolicyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def int_list(minimum: int, what: str | None = None) -> Callable[[str], list[int]]:
    """An argparse ``type``: comma-separated integers, each >= ``minimum``; an empty list or a bad
    element is refused with the whole value, as ``expected WHAT, got 'TEXT'`` (``what``: by
    default ``a comma-separated list of integers >= MINIMUM``).

    >>> parser = argparse.ArgumentParser(prog="bench")
    >>> _ = parser.add_argument("--depths", type=int_list(1), default="1,8,32")
    >>> parser.parse_args([]).depths  # a string default goes through the type too
    [1, 8, 32]
    >>> int_list(1)("4,0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a comma-separated list of integers >= 1, got '4,0'
    >>> int_list(1)("4,,8")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a comma-separated list of integers >= 1, got '4,,8'
    """
    expected = f"a comma-separated list of integers >= {minimum}" if what is None else what
    return _number_list(int, minimum, expected)


def float_list(minimum: float, what: str | None = None) -> Callable[[str], list[float]]:
    """An argparse ``type``: comma-separated finite numbers, each >= ``minimum``, refused as
    :func:`int_list` refuses (``what``: by default ``a comma-separated list of numbers >=
    MINIMUM``).

    >>> float_list(0)("0,0.75")
    [0.0, 0.75]
    >>> float_list(0)("0.5,nan")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a comma-separated list of numbers >= 0, got '0.5,nan'
    >>> float_list(0, "Zipf exponents >= 0")("")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected Zipf exponents >= 0, got ''
    """
    expected = f"a comma-separated list of numbers >= {minimum}" if what is None else what
    return _number_list(float, minimum, expected)


def _number_list(convert: Callable[[str], float], minimum: float, expected: str) -> Callable:
    """The parser of :func:`int_list` and :func:`float_list`: ``convert`` each element."""

    def parse(text: str) -> list:
        try:
            values = [convert(part) for part in text.split(",")]
        except ValueError:
            values = []
        if math.inf in values:  # '1e400' too
            raise argparse.ArgumentTypeError(
                f"too large: expected {expected}, {_MOST_FLOAT}, got {shown(text)}"
            )
        if not values or not all(math.isfinite(v) and v >= minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {shown(text)}")
        return values

    return parse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows an option's default where there is one to show: not None or False, and not already
    said in its help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unshown = action.default is None or action.default is False  # 0 is a default to show
        if unshown or action.default is argparse.SUPPRESS or "default" in text:
            return action.help
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return action.help


class DocHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """:class:`DefaultsHelpFormatter` keeping a docstring's line breaks (description, epilog)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reading any word that starts with ``-`` and a digit as a value, as
    argparse does only for plain numbers: ``--gpu-budget -1GiB`` then reaches the option's own
    check (which names it and says what is expected), not "expected one argument". Its
    subcommands' parsers are of this class too.

    >>> p = ArgumentParser(prog="x")
    >>> _ = p.add_argument("--budget")
    >>> p.parse_args(["--budget", "-1GiB"]).budget
    '-1GiB'
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\d")


class IntermixedParser(ArgumentParser):
    """A subcommand's parser whose list of positionals may have options between its words
    (``unshard OUT --overwrite S0 S1``): argparse alone ends the list at the first option and
    calls the words after it unrecognized."""

    _parsing = False  # parse_known_intermixed_args calls parse_known_args (Python 3.11, 3.12)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """Options and positionals in any order."""
        if self._parsing:
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def doc_parser(doc: str | None) -> ArgumentParser:
    r"""A script's parser from its module docstring: the first paragraph is the description, the
    rest (what it measures, how long it takes, examples) the epilog; defaults are shown.

    >>> p = doc_parser("Time the thing.\n\nTakes a minute.")
    >>> _ = p.add_argument("--rounds", type=int, default=3, help="rounds")
    >>> "rounds (default: 3)" in p.format_help() and "Takes a minute." in p.format_help()
    True
    """
    head, _, rest = (doc or "").strip().partition("\n\n")
    return ArgumentParser(description=head, epilog=rest or None, formatter_class=DocHelpFormatter)


def as_option_error(exc: ConfigError, names: Iterable[str]) -> ConfigError:
    """``exc`` as the command line says it: a message that starts with one of ``names`` (a
    keyword argument of the library) starts with its option instead.

    >>> str(as_option_error(ConfigError("max_tokens: got -5; expected an integer >= 1"), ["max_tokens"]))
    '--max-tokens: got -5; expected an integer >= 1'
    """
    key, sep, rest = str(exc).partition(": ")
    if sep and key in set(names):
        return ConfigError(f"--{key.replace('_', '-')}: {rest}")
    return exc


def public_command(script: str, argv: Sequence[str]) -> str:
    """``python SCRIPT ARGS`` as a report records it: each absolute path, alone or after an
    option's ``=``, cut to its last part (no machine paths in a published report).

    >>> public_command("bench/b.py", ["--dir", "/scratch/me/tables", "--rounds", "2", "--out=/x/r.json"])
    'python bench/b.py --dir tables --rounds 2 --out=r.json'
    """

    def public(arg: str) -> str:
        name, eq, value = arg.partition("=")
        if eq and name.startswith("--") and os.path.isabs(value):
            return f"{name}={Path(value).name}"
        return Path(arg).name if os.path.isabs(arg) else arg

    return " ".join(["python", script, *map(public, argv)])


# Every subcommand: the function that adds its parser (module:function) and its one-line help.
# Only the command a run names is imported and built, so that `tiered-store --help` and a
# mistyped command answer without importing torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": (
        "tiered_store.cli:_add_init",
        "create a table file (cold tier) from an array, a safetensors tensor, or random init",
    ),
    "info": ("tiered_store.cli:_add_info", "print a table's manifest"),
    "verify": (
        "tiered_store.cli:_add_verify",
        "re-check every block and page checksum of a table (or add its page checksums)",
    ),
    "shard": (
        "tiered_store.cli:_add_shard",
        "split a table into one shard table per rank (for ShardedStore)",
    ),
    "unshard": (
        "tiered_store.cli:_add_unshard",
        "join a table's (trained) shards back into one whole table",
    ),
    "convert-hf": (
        "tiered_store.cli:_add_convert_hf",
        "turn a DeepSeek-V4.1 Hugging Face checkpoint into tables and store configs",
    ),
    "export-trace": (
        "tiered_store.cli:_add_export_trace",
        "write one table's row ids of a trace as a flat int64 .npy (for other simulators)",
    ),
    "recover-trace": (
        "tiered_store.cli:_add_recover_trace",
        "make a trace of what a recording killed before it closed left (its whole chunks)",
    ),
    "demo": (
        "tiered_store.demo:register",
        "run an Engram LM over real text with its tables in memory vs in the tiered store",
    ),
    "replay": (
        "zipf_analysis.replay_cli:register",
        "replay an access trace through the cache tiers and report hit rates per tier",
    ),
    "analyze": (
        "zipf_analysis.analyze.cli:register",
        "corpus -> Engram traces, profiles, miss-ratio curves, tier sizes and a report",
    ),
    "serve": (
        "tiered_store.serve.cli:register_serve",
        "serve a converted Engram checkpoint over tiered stores via HTTP, with metrics",
    ),
    "init-model": (
        "tiered_store.serve.cli:register_init_model",
        "write a small seeded random Engram checkpoint for `serve` to try",
    ),
    "compact": (
        "tiered_store.delta.compaction:register",
        "fold a table's written rows (its LMDB delta) into a new table version",
    ),
    "train": (
        "tiered_store.engram.training:register",
        "train a small EngramLM with its Engram tables in the tiered store",
    ),
}


def command_help(name: str) -> str:
    """The one-line help of subcommand ``name`` (as the top-level ``--help`` lists it)."""
    return COMMANDS[name][1]
