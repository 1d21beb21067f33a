"""Configuration: one YAML loader, one validation style (frozen pydantic models), the store's sections.

Every configuration of the project (the store's, the Engram model's, the demo's and the server's)
is a tree of ``ConfigModel`` sections read by ``load_yaml``; errors are ``ConfigError`` naming the
key path, the value and what was expected (``format_validation_error``).

Example ``tiers.yaml``::

    table:
      path: table.npy            # relative to this file
    tiers:
      hot:  {capacity: 5%, device: cpu, policy: lru}
      warm: {capacity: 256MiB, policy: lru}
      cold: {io: direct, threads: 8}
    prefetch: {depth: 2}
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    model_validator,
)
from pydantic import ValidationError as _PydanticValidationError

from policies.zipf_tuned import DEFAULT_RECENCY_WINDOW

from .atomic_file import special_file
from .capacity import check_capacity_spec
from .errors import ConfigError, cut_text, shown

__all__ = [
    "DEFAULTS",
    "CacheTierConfig",
    "ColdTierConfig",
    "ConfigModel",
    "CostModelConfig",
    "FieldError",
    "HotTierConfig",
    "MetricsConfig",
    "PrefetchConfig",
    "RepinConfig",
    "ShardingConfig",
    "StoreConfig",
    "TableConfig",
    "TiersConfig",
    "WarmTierConfig",
    "check_address",
    "drop_unknown_keys",
    "dump_yaml",
    "format_validation_error",
    "int_at_least",
    "load_yaml",
]

# Every default of the store configuration, with its unit (optional paths and checks, whose
# absence means "not set", are not defaults and not listed).
MAX_COLD_THREADS = 256  # cold.threads (and ColdTable's threads): readers of one table at most

DEFAULTS: dict[str, Any] = {
    "table.out_of_range": "error",  # ids outside [0, rows): "error", or "zero" rows (DeepSeek-V4.1)
    "tier.capacity": 0,  # rows (or bytes like "1GiB", or "5%"), hot and warm alike
    "tier.policy": "lru",  # eviction[+admission] policy name, see `policies`
    "tier.index": "auto",  # row -> slot: "dense" (4 B/table row), "hashed" (16 B/slot), "auto"
    "tier.recency_window": DEFAULT_RECENCY_WINDOW,  # lookups a zipf-tuned recency segment covers
    "tier.evict_headroom": 0.0,  # fraction of capacity freed each time eviction runs (0 = exact)
    # online re-pinning of a zipf-tuned tier (tiers.<tier>.repin), see tiered_store.online_repin
    # zipf-tuned tiers count episodes while serving and re-pin; "auto": only without a profile
    # (with one, its pins stay fixed unless asked: counting costs CPU on every lookup)
    "repin.enabled": "auto",
    "repin.every": 65_536,  # lookups of the tier between re-pins (one default recency window)
    "repin.budget": "2%",  # rows pinned per re-pin at most: an int, or a share of the pinned rows
    "repin.decay": 0.9934,  # weight of past counts per `every` lookups (1: never forget): 0.9 per 1M
    "repin.prior_weight": 1.0,  # an offline profile's episode counts as this many served ones
    # sketch counters per slot per sketch row (rounded up to a power of two, at least 16 a sketch
    # row): 2 = 32-64 B per slot, 256 B at the least (more a slot below 4 slots);
    # 4 counts more exactly for twice that and a slower count
    "repin.sketch_width": 2,
    # while a tier's rows stay put (no admission or eviction 4 windows in a row), count one window
    # in 2, 4, ... as the spell grows, at most one in this many, each weighted by the windows it
    # stands for (1: every window)
    "repin.quiet_sample": 64,
    "hot.device": "cpu",  # compute device: "cpu", "cuda", "cuda:N"
    "warm.pin_memory": "auto",  # rows bound for a CUDA device staged in pinned host RAM
    "cold.io": "pread",  # "mmap" (page cache) | "pread" (threads) | "direct" (threads, O_DIRECT)
    # | "uring" (O_DIRECT through io_uring, Linux x86-64)
    # warm restart: off by default, since it writes TABLE.npy.restart beside the table (which may sit
    # on read-only or shared storage) and every process serving one table would share that file
    "restart.enabled": False,
    # what open waits for of a warm restart: "none" (serve at once), "hot" (the hot tier's rows,
    # a fraction of a second), "all" (the whole restore)
    "restart.open_waits_for": "none",
    "cold.threads": 8,  # parallel readers (io: uring: rings, each driven by one thread)
    "cold.queue_depth": 128,  # io: uring: reads in flight per ring
    "prefetch.depth": 2,  # prefetches in flight before prefetch() blocks
    "prefetch.lookahead": False,  # never evict rows that queued prefetches will use
    "metrics.address": "127.0.0.1:9400",  # host:port of serve's /metrics ("": none); checked on load
    "sharding.by": "heads",  # "heads" (whole hash heads per rank) | "rows" (equal row ranges)
    "sharding.backend": "auto",  # torch.distributed backend: "gloo", "nccl", "auto" (by device)
    "sharding.timeout_s": 60.0,  # seconds before a lookup gives up on a silent rank
    # replay's cost model: an H200-class GPU on PCIe 5 with a datacentre NVMe
    "cost_model.hbm_gbps": 4800.0,  # GB/s, hot-tier gathers on the device
    "cost_model.pcie_gbps": 50.0,  # GB/s, host -> device copies
    "cost_model.dram_gbps": 100.0,  # GB/s, warm-tier gathers in host RAM
    "cost_model.nvme_read_iops": 1_000_000.0,  # random 4 KiB reads per second
    "cost_model.nvme_latency_us": 80.0,  # microseconds, one random read's latency
    "cost_model.compute_seconds_per_batch": 0.0,  # seconds of work prefetch can hide behind
}

# -- the YAML loader ------------------------------------------------------------------------------


def load_yaml(path: str | Path, *, what: str = "config file") -> dict[str, Any]:
    """Read a YAML (or JSON: a ``.json`` file, any case, read as JSON) file whose top level is a
    mapping.

    A number with an exponent is a number as in JSON and YAML 1.2 (``1e-6``, ``5E5``), not the
    string YAML 1.1 reads; quote it for a string. A leading 0 that makes an integer octal in YAML
    1.1 (``010``: 8) is refused.

    Parameters
    ----------
    path
        The file.
    what
        What the file is, for error messages (``"config file"``, ``"Engram config"``, ...).

    Returns
    -------
    dict
        The parsed mapping; an empty file reads as ``{}``.

    Raises
    ------
    ConfigError
        The file cannot be read (or is a device or socket: a FIFO, a shell's ``<(...)``, is
        read), is not valid YAML, or its top level is not a mapping; the message names ``what``
        and the path.

    Examples
    --------
    >>> load_yaml("examples/tiers.yaml")["tiers"]["cold"]
    {'io': 'direct', 'threads': 8}
    >>> load_yaml("examples/nope.yaml", what="store config")
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: store config examples/nope.yaml: cannot read (No such file or directory); expected a readable YAML file
    """
    if (problem := path_text_problem(str(path))) is not None:  # pathlib's bare errors otherwise
        raise ConfigError(f"{what} {shown(str(path))}: {problem}")
    path = Path(expand_home(path))  # ~ is the home folder, as in the paths it holds
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    # a device's read (/dev/zero) never ends; a FIFO is read as any file: the user's pipe (a
    # shell's `<(gen-config)`), its writer's to end; a path not there: the read below says why
    not_file = special_file(path)
    if not_file is not None and not path.is_fifo():
        raise ConfigError(f"{what} {path}: it is {not_file}; expected a {kind} file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(  # a path of 100,000 characters (PATH_MAX is 4,096), cut short
            f"{what} {cut_text(str(path), 4096)}: cannot read ({exc.strerror}); expected a "
            f"readable {kind} file"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not UTF-8 text; expected a {kind} file") from None
    if kind == "JSON":  # JSON's own reader: YAML refuses a tab indenting JSON
        data = _parse_json(text, f"{what} {path}")
    else:
        loader = None
        try:
            loader = _UniqueKeyLoader(text)  # reads the text: a control character is a YAMLError
            node = loader.get_single_node()
            expanded = _expanded_size(node)
            if expanded > MAX_YAML_VALUES:
                raise ConfigError(
                    f"{what} {path}: its aliases (*name) expand it to more than {MAX_YAML_VALUES:,} "
                    "values, or into itself; expected a configuration of at most that many"
                )
            data = None if node is None else loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{what} {path}: not valid YAML: {exc}") from None
        except RecursionError:  # PyYAML composes nested collections recursively
            raise ConfigError(
                f"{what} {path}: its collections are nested deeper than YAML can be read here; "
                "expected a configuration of a few levels of sections"
            ) from None
        finally:
            if loader is not None:
                loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{what} {path}: got a {type(data).__name__} at the top; expected a mapping of sections"
        )
    return data


#: the config file whose keys the code running now resolves (see ``naming_file``), or None
_config_file: ContextVar[str | None] = ContextVar("_config_file", default=None)


@contextmanager
def naming_file(path: str | Path) -> Iterator[None]:
    """A ConfigError raised inside names the config file ``path`` first (``tiers.yaml:
    tiers.hot.policy: ...``), as the file's own schema errors do; its class is kept. So does a
    warning's message made with ``in_config_file`` inside. Nested, the names add up (``serve.yaml:
    store (layer 1): ...``)."""
    outer = _config_file.get()
    token = _config_file.set(str(path) if outer is None else f"{outer}: {path}")
    try:
        yield
    except ConfigError as exc:
        if len(exc.args) == 1 and isinstance(exc.args[0], str):
            exc.args = (f"{path}: {exc.args[0]}",)
        raise
    finally:
        _config_file.reset(token)


def in_config_file(text: str) -> str:
    """``text`` (a warning naming a config key) naming the config file first inside
    ``naming_file``, as it is outside."""
    path = _config_file.get()
    return text if path is None else f"{path}: {text}"


def repeated_key(pairs: list[tuple[str, Any]]) -> str | None:
    """The first key a JSON object's ``pairs`` give twice (``json.loads`` keeps the last), or
    None."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None


def _parse_json(text: str, where: str) -> Any:
    """The JSON document ``text`` (None when blank; a byte-order mark before it is skipped, as the
    YAML reader does); a key given twice in an object is refused (``json.loads`` kept the last).
    Errors are ConfigErrors naming ``where``."""

    def distinct_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if (key := repeated_key(pairs)) is not None:
            raise ValueError(f"key {shown(key)} given twice; expected each key once")
        return dict(pairs)

    try:
        text = text.removeprefix("\ufeff")
        return json.loads(text, object_pairs_hook=distinct_keys) if text.strip() else None
    except RecursionError:
        raise ConfigError(
            f"{where}: its collections are nested deeper than JSON can be read here; expected "
            "a configuration of a few levels of sections"
        ) from None
    except ValueError as exc:  # json.JSONDecodeError too
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None


# -- validation -----------------------------------------------------------------------------------


class FieldError(ValueError):
    """A check across fields failed; ``key`` is the path of the field it blames, from the model.

    Raised inside a model validator, it makes ``format_validation_error`` name that field instead
    of the model: ``FieldError(("engram", "layer_ids", 1), "expected ...")`` reads
    ``engram.layer_ids[1]: expected ...``.
    """

    def __init__(self, key: str | tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.key = (key,) if isinstance(key, str) else tuple(key)


def format_validation_error(
    exc: _PydanticValidationError,
    source: str | None = None,
    *,
    model: type[BaseModel] | None = None,
    prefix: tuple[str | int, ...] = (),
) -> str:
    """One line per problem of a pydantic ``ValidationError``: key path, what is wrong, the value.

    Parameters
    ----------
    exc
        The validation error.
    source
        Where the configuration came from (a file, ``"config"``); when given, a header line names
        it and the problems follow indented.
    model
        The model that was validated: unknown keys then list the keys that are known.
    prefix
        Key path of ``model`` inside a larger file (``("engram",)``), put before every key.

    Returns
    -------
    str
        The message for a ``ConfigError``.

    Examples
    --------
    >>> try:
    ...     StoreConfig.model_validate({"table": {"path": "t.npy"}, "prefetch": {"dept": 3}})
    ... except _PydanticValidationError as exc:
    ...     print(format_validation_error(exc, "tiers.yaml", model=StoreConfig))
    tiers.yaml: invalid configuration
      prefetch.dept: unknown key; expected one of depth, lookahead
    """
    lines = []
    for err in exc.errors():
        parts = _key_parts(err["loc"], keep_last=err["type"] == "extra_forbidden")
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, FieldError):
            parts = (*parts, *error.key)
        key = _key_path((*prefix, *parts))
        msg, got = err["msg"].removeprefix("Value error, "), f" (got {shown(err.get('input'))})"
        if err["type"] == "extra_forbidden":
            known = _known_keys(model, parts[:-1]) if model is not None else None
            expected = ", ".join(known) if known else "the documented keys (see examples/*.yaml)"
            msg, got = f"unknown key; expected one of {expected}", ""
        elif err["type"] == "missing":
            msg, got = "missing; expected a value (this key is required)", ""
        elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = "expected a mapping"
        elif err["type"] == "value_error":
            got = ""  # the project's validators say what they got themselves
        lines.append(f"{key}: {msg}{got}" if key else f"{msg}{got}")
    lines = list(dict.fromkeys(lines))
    if source is None:
        return "\n".join(lines)
    return "\n".join([f"{source}: invalid configuration", *(f"  {line}" for line in lines)])


def drop_unknown_keys(model: type[BaseModel], data: Any) -> Any:
    """``data`` without the keys ``model`` does not declare, in its nested sections too.

    Examples
    --------
    >>> drop_unknown_keys(StoreConfig, {"table": {"path": "t.npy", "note": 1}, "extra": 2})
    {'table': {'path': 't.npy'}}
    """
    if not isinstance(data, Mapping):
        return data
    out = {}
    for key, value in data.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is not None:
            section = _section_model(field.annotation)
            out[key] = drop_unknown_keys(section, value) if section is not None else value
    return out


def int_at_least(minimum: int, at_most: int | None = None) -> Any:
    """The annotation of an integer field ``>= minimum`` (and ``<= at_most``), bools refused.

    Examples
    --------
    >>> class Run(ConfigModel):
    ...     batches: int_at_least(1) = 16
    ...     threads: int_at_least(1, 64) = 8
    >>> Run(batches=0)
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: batches: expected an integer >= 1, got 0
    >>> Run(threads=True)
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: threads: expected an integer from 1 to 64, got True
    """
    expected = f">= {minimum}" if at_most is None else f"from {minimum} to {at_most}"

    def check(value: Any) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (at_most is not None and value > at_most)
        ):
            raise ValueError(f"expected an integer {expected}, got {shown(value)}")
        return int(value)

    return Annotated[int, PlainValidator(check)]


def _not_a_bool(value: Any) -> Any:
    """Refuse a bool where a number is expected (``yes`` in YAML is not 1.0), and NaN or infinity
    before a bound does (which said ``less than or equal to`` of NaN)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str):  # "nan" or "1e999" in quotes, which pydantic reads as a float
        try:
            number = float(value)
        except ValueError:
            return value  # not a number: pydantic says so
        _finite(number)
        return value
    return _finite(value) if isinstance(value, float) else value


def _finite(value: float) -> float:
    """Refuse infinity and NaN (``.inf`` in YAML): every number here is a finite quantity."""
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


#: a finite float field that refuses bools (pydantic reads True as 1.0); constraints go in
#: ``Field``
Number = Annotated[float, BeforeValidator(_not_a_bool), AfterValidator(_finite)]


def _a_path(value: Any) -> Any:
    """A file's path, or None; a list or number (ids given inline) named as such."""
    if value is None or isinstance(value, str | Path):
        return None if value is None else str(value)
    raise ValueError(
        f"got {shown(value)}; expected the path of a file (row lists: a .npy of row ids, such as "
        "`analyze`'s layer1.top_rows.npy; profiles: its .npz)"
    )


def no_nul(value: Any) -> Any:
    """A path's text without a NUL character or a lone surrogate (``"\\ud800"``), which no path
    holds (pathlib raised a bare ValueError, or UnicodeEncodeError, when it was resolved), and
    not empty (which resolved to the config file's folder)."""
    if value == "":
        raise ValueError("got ''; expected a path ('.' for the folder paths are relative to)")
    if isinstance(value, str) and (problem := path_text_problem(value)) is not None:
        raise ValueError(f"got {shown(value)}; {problem}")
    return value


def expand_home(text: str | os.PathLike[str]) -> str:
    """``text`` with a leading ``~`` or ``~user`` read as that home folder, as in a shell
    (os.path.expanduser); with HOME set but empty, where Python reads ``~`` as ``/``, a leading
    ``~`` is a ``ConfigError`` naming the path instead.

    >>> expand_home("./~/t.npy")
    './~/t.npy'
    """
    text = os.fspath(text)
    if os.environ.get("HOME") == "" and (text == "~" or text.startswith("~/")):
        raise ConfigError(
            f"{text!r}: HOME is set but empty, so '~' would be read as '/'; expected HOME to "
            "name the home folder, or a path without a leading '~'"
        )
    return os.path.expanduser(text)


def path_text_problem(text: str) -> str | None:
    """What a path's text holds that no file name does (pathlib raises a bare ValueError for a
    NUL character, UnicodeEncodeError for a lone surrogate: one an undecodable byte's, as Python
    reads file names, is fine), as what was expected; None when it holds neither."""
    if "\x00" in text:
        return "expected a path without a NUL character"
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return (
            "expected a path without a lone surrogate (a \\ud800-\\udfff escape, which no file "
            "name holds)"
        )
    return None


def checked_path_text(base_dir: Path, text: str, where: str | None = None) -> str:
    """A config file's path ``text`` with its ``~`` expanded (:func:`expand_home`), refused when
    relative to a pipe's folder (:func:`refuse_relative_in_pipe`); ``where``: the file and key
    that gave it (``s.yaml: table.path``), put before either refusal."""
    try:
        text = expand_home(text)
    except ConfigError as exc:  # HOME set but empty
        raise ConfigError(str(exc) if where is None else f"{where}: {exc}") from None
    refuse_relative_in_pipe(base_dir, text, where)
    return text


def resolved_under(base_dir: Path, text: str, where: str | None = None) -> str:
    """A config file's path ``text``, absolute: ``~`` is the user's home, as in a shell (a
    ``~user`` of no user this machine has stays as written); a relative path is under
    ``base_dir`` (the file's folder). os.path.realpath, as Path.resolve raises a bare
    RuntimeError on a symlink loop (the open names the path). ``where``: the file and key that
    gave ``text`` (``s.yaml: table.path``), put before :func:`expand_home`'s refusal."""
    return os.path.realpath(base_dir / checked_path_text(base_dir, text, where))


#: a process's (or a task's) descriptors, the real folder of /dev/fd, /proc/self/fd and
#: /proc/thread-self/fd, and of a pipe's /dev/stdin
_DESCRIPTORS = re.compile(r"/proc/[^/]+(?:/task/[^/]+)?/fd")


def config_folder(path: Path) -> Path:
    """The folder a config file's relative paths are under: its own; for one read through a
    process's descriptors (``/dev/fd/N``, ``/proc/self/fd/N``, ``/dev/stdin``: that folder, or
    /dev, holds no file of the config's), the folder of the file open there, or for a pipe the
    descriptors' own (which :func:`refuse_relative_in_pipe` knows)."""
    link = os.path.abspath(path)
    for _ in range(40):  # the links to follow (a loop of them: the open names it)
        if _DESCRIPTORS.fullmatch(os.path.realpath(os.path.dirname(link))):
            return Path(os.path.dirname(os.path.realpath(path)))
        try:
            link = os.path.join(os.path.dirname(link), os.readlink(link))
        except OSError:  # not a link: a file's own folder
            break
    return path.parent


def refuse_relative_in_pipe(base_dir: Path, text: str, where: str | None = None) -> None:
    """A ``ConfigError`` for the relative path ``text`` of a config read from a pipe (a shell's
    ``<(...)``, ``/dev/fd/N``, ``/dev/stdin``: ``base_dir`` from :func:`config_folder`): its
    folder, a process's descriptors, holds no file to resolve it under (``where``: the file and
    key that gave it)."""
    if os.path.isabs(text) or not _DESCRIPTORS.fullmatch(os.path.realpath(base_dir)):
        return
    raise ConfigError(
        f"{'' if where is None else where + ': '}{text!r} is a relative path in a config read "
        f"from a pipe (a shell's <(...)), whose folder {base_dir} holds no files to resolve it "
        "under; expected an absolute path (or one starting with ~)"
    )


def _not_a_number(value: Any) -> Any:
    """A path's text; a number (a name YAML reads as one unquoted: 1e5, 2024) named as such."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(
            f"got the number {shown(value)}; expected a path: quote it (YAML reads 1e5, 0x10 or "
            "1_000 unquoted as a number)"
        )
    return value


#: the path of a file the config names (row lists, profiles), or None
FilePath = Annotated[str | None, BeforeValidator(_a_path), AfterValidator(no_nul)]
#: a path (a table's, a checkpoint folder's) as text
PathText = Annotated[str, BeforeValidator(_not_a_number), AfterValidator(no_nul)]


def _non_string_key_message(key: Any) -> str:
    """What is wrong with a mapping key that is not a string."""
    return (
        f"key {shown(key)}: expected a string key; quote it (YAML reads unquoted no/yes/on/off as "
        "booleans, and digits as numbers)"
    )


def _find_non_string_key(model: type[BaseModel], data: Mapping, parts: tuple) -> str | None:
    """The first key of ``data`` or of its sections that is not a string, as an error line."""
    for key, value in data.items():
        if not isinstance(key, str):
            where = f"{_key_path(parts)}: " if parts else ""
            return f"{where}{_non_string_key_message(key)}"
        field = model.model_fields.get(key)
        section = _section_model(field.annotation) if field is not None else None
        if section is not None and isinstance(value, Mapping):
            found = _find_non_string_key(section, value, (*parts, key))
            if found is not None:
                return found
    return None


#: values (scalars and collections) a configuration file may hold once its aliases are expanded:
#: every check and error message walks them, so a few lines of nested aliases must not make billions
MAX_YAML_VALUES = 1_000_000


def _expanded_size(root: yaml.Node | None) -> int:
    """How many values the YAML node graph ``root`` holds with its aliases expanded (a node
    reached through N aliases counts N times), counted once per node; a node that contains itself
    counts as more than ``MAX_YAML_VALUES``."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [] if root is None else [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        children = _child_nodes(node)
        if children_done:
            open_nodes.discard(id(node))
            size[id(node)] = min(1 + sum(size[id(c)] for c in children), MAX_YAML_VALUES + 1)
            continue
        if id(node) in open_nodes:  # a recursive alias: it expands without end
            return MAX_YAML_VALUES + 1
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
    return 0 if root is None else size[id(root)]


def _child_nodes(node: yaml.Node) -> list[yaml.Node]:
    """The nodes a sequence or mapping node holds (keys and values); none for a scalar."""
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (it kept the last) and
    a key that is not a string."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<': merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)  # a list's items, to name it
            if not isinstance(key, str):  # pydantic fails on it with a bare TypeError
                raise yaml.constructor.ConstructorError(
                    None, None, _non_string_key_message(key), key_node.start_mark
                )
            try:
                mark = first.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if mark is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {shown(key)} given twice (first on line {mark.line + 1}); expected each key "
                    "once",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """YAML 1.1's integer, but a leading 0 that makes it octal (``010``: 8; 10 in YAML 1.2
        and to a reader) is refused, and so is one of more digits than ``int()`` reads."""
        text = str(node.value).replace("_", "")
        sign, digits = ("-", text[1:]) if text[:1] == "-" else ("", text.lstrip("+"))
        limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()  # 3.10.7 on; 0: none
        if limit and len(digits) > limit and digits.isdigit():  # int() raised a bare ValueError
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"an integer of {len(digits):,} digits; expected at most {limit:,} (Python reads "
                "no longer one)",
                node.start_mark,
            )
        if digits[:1] == "0" and digits.isdigit() and int(digits, 8) != int(digits):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{node.value}: a leading 0 makes it octal in YAML 1.1 ({sign}{int(digits, 8)}); "
                f"expected the number without it ({sign}{int(digits)}), or quoted for a string",
                node.start_mark,
            )
        return super().construct_yaml_int(node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)

# YAML 1.2's (and JSON's) floats with an exponent that YAML 1.1 reads as strings: no dot (1e-06,
# as Python's json writes it; 5E5), or no sign after the e (1.5e3); tried after 1.1's own
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789")
)


class _RoundTripDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` resolving plain scalars as ``load_yaml`` does: a string it would read
    as a number (``'1e3'``, which YAML 1.1 reads as text) is written quoted."""


_RoundTripDumper.add_implicit_resolver(
    "tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789")
)


def dump_yaml(doc: Mapping[str, Any]) -> str:
    """``doc`` as YAML text, keys in order, that ``load_yaml`` reads back as ``doc``
    (``yaml.safe_dump`` wrote the string ``'1e3'`` unquoted, read back as the number 1000.0).

    >>> print(dump_yaml({"profile": "1e5", "capacity": "5%", "every": 1000}), end="")
    profile: '1e5'
    capacity: 5%
    every: 1000
    """
    return yaml.dump(doc, Dumper=_RoundTripDumper, sort_keys=False)


def checked_by(check: Callable[[Any], Any], kind: type = object) -> Any:
    """The annotation of a field that ``check`` validates (and converts) entirely."""
    return Annotated[kind, PlainValidator(check)]


# True while a section is being validated: pydantic validates nested sections through their
# ``__init__``, which must then leave its errors to the enclosing validation.
_inside_validation: ContextVar[bool] = ContextVar("_inside_validation", default=False)


@contextmanager
def _validating() -> Iterator[None]:
    """Mark the current context as inside a section's validation."""
    token = _inside_validation.set(True)
    try:
        yield
    finally:
        _inside_validation.reset(token)


ConfigT = TypeVar("ConfigT", bound="ConfigModel")


class ConfigModel(BaseModel):
    """Base of every configuration section: frozen, unknown keys refused, errors as ConfigError.

    ``section`` is the key path of a model that is also validated on its own (``("engram",)``),
    so that its errors name the same keys as inside a whole file. Building a section directly
    (``EngramConfig(seed=1)``) and ``from_dict`` check the same way.

    Examples
    --------
    >>> PrefetchConfig(depth=0)
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: prefetch.depth: expected an integer from 1 to 64, got 0
    >>> PrefetchConfig.from_dict({"depth": 4, "note": "x"}, ignore_unknown=True).depth
    4
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    section: ClassVar[tuple[str | int, ...]] = ()

    def __init__(self, **data: Any) -> None:
        if _inside_validation.get():  # a nested section: pydantic reports it with the whole path
            super().__init__(**data)
            return
        try:
            with _validating():
                super().__init__(**data)
        except _PydanticValidationError as exc:
            cls = type(self)
            raise ConfigError(format_validation_error(exc, model=cls, prefix=cls.section)) from None

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_take_defaults(cls, data: Any) -> Any:
        """A section left empty (``prefetch:`` with its keys commented out: YAML's null) takes
        its defaults, as an empty file does; a section that has none is still missing."""
        if not isinstance(data, Mapping):
            return data
        return {
            key: value
            for key, value in data.items()
            if not (value is None and _has_default_section(cls, key))
        }

    @classmethod
    def model_validate(cls: type[ConfigT], obj: Any, **options: Any) -> ConfigT:
        """Pydantic's ``model_validate`` (raises its ``ValidationError``), sections checked whole."""
        with _validating():
            return super().model_validate(obj, **options)

    @classmethod
    def from_dict(
        cls: type[ConfigT], data: Any, *, source: str | None = None, ignore_unknown: bool = False
    ) -> ConfigT:
        """Validate a mapping; unknown keys are an error unless ``ignore_unknown``."""
        if not isinstance(data, Mapping):
            where = source or _key_path(cls.section) or "config"
            raise ConfigError(f"{where}: got {type(data).__name__}; expected a mapping")
        if ignore_unknown:
            data = drop_unknown_keys(cls, data)
        bad_key = _find_non_string_key(cls, data, cls.section)
        if bad_key is not None:
            raise ConfigError(
                bad_key if source is None else f"{source}: invalid configuration\n  {bad_key}"
            )
        try:
            return cls.model_validate(dict(data))
        except _PydanticValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, source, model=cls, prefix=cls.section)
            ) from None


def _key_parts(loc: tuple[str | int, ...], *, keep_last: bool) -> tuple[str | int, ...]:
    """A pydantic error location without its validator and union-member tags."""
    last = len(loc) - 1

    def is_tag(i: int, part: str | int) -> bool:
        if isinstance(part, int) or (keep_last and i == last):
            return False
        return part in ("int", "str", "bool", "float") or part.startswith(
            ("function-", "constrained-", "literal[")
        )

    return tuple(part for i, part in enumerate(loc) if not is_tag(i, part))


def _key_path(parts: tuple[str | int, ...]) -> str:
    """``("engram", "layer_ids", 1)`` -> ``"engram.layer_ids[1]"``."""
    path = ""
    for part in parts:
        name = cut_text(str(part), 60)  # a key of 100,000 characters, cut short
        path += f"[{part}]" if isinstance(part, int) else (f".{name}" if path else name)
    return path


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model class of a nested section's annotation (``Section | None`` too), else None."""
    options = (
        get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    )
    return next((t for t in options if isinstance(t, type) and issubclass(t, BaseModel)), None)


def _has_default_section(model: type[BaseModel], key: Any) -> bool:
    """Whether ``key`` of ``model`` is a nested section that has a default."""
    field = model.model_fields.get(key) if isinstance(key, str) else None
    return (
        field is not None
        and not field.is_required()
        and _section_model(field.annotation) is not None
    )


def _known_keys(model: type[BaseModel], parts: tuple[str | int, ...]) -> list[str] | None:
    """Sorted keys of the section at ``parts`` below ``model`` (None if it is not a section)."""
    for part in parts:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        section = _section_model(field.annotation) if field is not None else None
        if section is None:
            return None
        model = section
    return sorted(model.model_fields)


# -- the store's sections ---------------------------------------------------------------------------


#: the highest N of ``cuda:N`` torch reads as written: its device index is 8 bits (``cuda:128``
#: read as index -128, ``cuda:255`` as plain ``cuda``, the current device)
MAX_DEVICE_INDEX = 127


def check_device(value: Any) -> str:
    """A compute device name: ``cpu``, ``cuda`` or ``cuda:N`` (N as torch reads it: no leading
    0, at most ``MAX_DEVICE_INDEX``)."""
    if isinstance(value, str) and value in ("cpu", "cuda"):
        return value
    index = value[5:] if isinstance(value, str) and value.startswith("cuda:") else ""
    if not (index.isascii() and index.isdigit()):
        raise ValueError(f"got {shown(value)}; expected 'cpu', 'cuda' or 'cuda:N'")
    if index[0] == "0" and index != "0" or len(index) > 3 or int(index) > MAX_DEVICE_INDEX:
        raise ValueError(  # torch refused a leading 0 with a bare RuntimeError, read 255 as 'cuda'
            f"got {shown(value)}; expected 'cuda:N' with N from 0 to {MAX_DEVICE_INDEX} written "
            "without a leading 0"
        )
    return value


def _check_bool_or_auto(value: Any) -> bool | str:
    """``true``, ``false`` or ``"auto"``."""
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(f"got {shown(value)}; expected true, false or 'auto'")


Capacity = checked_by(check_capacity_spec, int | str)
Device = checked_by(check_device, str)
BoolOrAuto = checked_by(_check_bool_or_auto, bool | str)


class TableConfig(ConfigModel):
    """Where the cold table lives; ``dim``/``dtype``, when given, are checked against its manifest."""

    section: ClassVar[tuple[str, ...]] = ("table",)
    path: PathText
    dim: int_at_least(1) | None = None
    dtype: Literal["float32", "float16", "bfloat16", "uint8"] | None = None
    out_of_range: Literal["error", "zero"] = DEFAULTS["table.out_of_range"]


def _check_budget(value: Any) -> int | str:
    """A re-pin budget: a row count >= 1 or a share like ``'10%'`` (above 0, at most 100)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1])
        except ValueError:
            share = -1.0
        if 0 < share <= 100:
            return value
    raise ValueError(
        f"got {shown(value)}; expected a row count >= 1 or a share of the pinned rows like '10%' "
        "(above 0%, at most 100%)"
    )


class RepinConfig(ConfigModel):
    """Online re-pinning of a ``zipf-tuned`` tier (see ``tiered_store.online_repin``): count
    episodes while serving and, every ``every`` lookups, move at most ``budget`` rows into the
    pinned segment."""

    enabled: BoolOrAuto = DEFAULTS["repin.enabled"]
    every: int_at_least(1) = DEFAULTS["repin.every"]
    budget: checked_by(_check_budget, int | str) = DEFAULTS["repin.budget"]
    decay: Number = Field(default=DEFAULTS["repin.decay"], gt=0.0, le=1.0)
    prior_weight: Number = Field(default=DEFAULTS["repin.prior_weight"], ge=0.0)
    sketch_width: int_at_least(1, 64) = DEFAULTS["repin.sketch_width"]
    quiet_sample: int_at_least(1) = DEFAULTS["repin.quiet_sample"]


class CacheTierConfig(ConfigModel):
    """One cache tier: how many rows it holds and which policy decides what stays."""

    capacity: Capacity = DEFAULTS["tier.capacity"]
    policy: str = DEFAULTS["tier.policy"]
    static_rows: FilePath = None  # .npy of row ids (hottest first) pinned by a 'static' policy
    preload_rows: FilePath = None  # .npy of row ids loaded at open (warm start, not pinned)
    profile: FilePath = None  # frequency profile (.npz from `tiered-store analyze`), zipf-tuned
    recency_window: int_at_least(1) = DEFAULTS["tier.recency_window"]
    index: Literal["auto", "dense", "hashed"] = DEFAULTS["tier.index"]  # row -> slot index
    evict_headroom: Number = Field(default=DEFAULTS["tier.evict_headroom"], ge=0.0, le=0.5)
    repin: RepinConfig = RepinConfig()  # zipf-tuned only: online counting and re-pinning


class HotTierConfig(CacheTierConfig):
    """The hot tier lives on the compute device."""

    section: ClassVar[tuple[str, ...]] = ("tiers", "hot")
    device: Device = DEFAULTS["hot.device"]


class WarmTierConfig(CacheTierConfig):
    """The warm tier lives in pageable host RAM; ``pin_memory`` stages the rows it and the cold
    tier send to a CUDA device in pinned buffers (auto: when the compute device is CUDA)."""

    section: ClassVar[tuple[str, ...]] = ("tiers", "warm")
    pin_memory: BoolOrAuto = DEFAULTS["warm.pin_memory"]


class ColdTierConfig(ConfigModel):
    """How rows are read from the table file."""

    section: ClassVar[tuple[str, ...]] = ("tiers", "cold")
    io: Literal["mmap", "pread", "direct", "uring"] = DEFAULTS["cold.io"]
    threads: int_at_least(1, MAX_COLD_THREADS) = DEFAULTS["cold.threads"]
    queue_depth: int_at_least(1, 4096) = DEFAULTS["cold.queue_depth"]


class RestartConfig(ConfigModel):
    """Warm restart: save the rows hot and warm hold (on close, and every ``save_every_s``) to
    ``TABLE.npy.restart`` and read them back in the background on open."""

    section: ClassVar[tuple[str, ...]] = ("tiers", "restart")
    enabled: StrictBool = DEFAULTS["restart.enabled"]
    open_waits_for: Literal["none", "hot", "all"] = DEFAULTS["restart.open_waits_for"]
    save_every_s: Number | None = Field(  # seconds; None: on close only
        default=None,
        gt=0.0,
        le=threading.TIMEOUT_MAX,  # an event's wait takes no more
    )


class TiersConfig(ConfigModel):
    """The three tiers."""

    section: ClassVar[tuple[str, ...]] = ("tiers",)
    hot: HotTierConfig = HotTierConfig()
    warm: WarmTierConfig = WarmTierConfig()
    cold: ColdTierConfig = ColdTierConfig()
    restart: RestartConfig = RestartConfig()


class PrefetchConfig(ConfigModel):
    """How far prefetch runs ahead."""

    section: ClassVar[tuple[str, ...]] = ("prefetch",)
    depth: int_at_least(1, 64) = DEFAULTS["prefetch.depth"]
    # Off by default: decisions then depend on the queue at run time, so a recorded trace no
    # longer replays to exactly equal counters.
    lookahead: StrictBool = DEFAULTS["prefetch.lookahead"]


class CostModelConfig(ConfigModel):
    """Bandwidths and latencies replay uses to model fetch and stall time."""

    section: ClassVar[tuple[str, ...]] = ("cost_model",)
    hbm_gbps: Number = Field(default=DEFAULTS["cost_model.hbm_gbps"], gt=0)
    pcie_gbps: Number = Field(default=DEFAULTS["cost_model.pcie_gbps"], gt=0)
    dram_gbps: Number = Field(default=DEFAULTS["cost_model.dram_gbps"], gt=0)
    nvme_read_iops: Number = Field(default=DEFAULTS["cost_model.nvme_read_iops"], gt=0)
    nvme_latency_us: Number = Field(default=DEFAULTS["cost_model.nvme_latency_us"], ge=0)
    compute_seconds_per_batch: Number = Field(
        default=DEFAULTS["cost_model.compute_seconds_per_batch"], ge=0
    )


def check_address(
    value: Any, key: str | None, *, allow_empty: bool = False, like: str = "127.0.0.1:8080"
) -> tuple[str, int] | None:
    """``"host:port"`` -> (host, port); ``""`` -> None when allowed; else (not text either)
    ConfigError naming ``key`` (None: a field's validator, whose error pydantic names) and an
    address ``like`` this."""
    where = "" if key is None else f"{key}: "
    if value == "" and allow_empty:
        return None
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if "[" in host or "]" in host or ":" in host:  # an IPv6 host: '[::1]', one pair around it
        inner = host[1:-1] if host[:1] == "[" and host[-1:] == "]" else ""
        if not inner or "[" in inner or "]" in inner:  # '[::1:80' was '::1' port 80, '::1' ':' 1
            raise ConfigError(
                f"{where}got {shown(value)}; expected 'host:port' like {like!r}, an IPv6 host "
                "in one pair of brackets ('[::1]:8080')"
            )
        host = inner
    if not sep or not host or not (port.isascii() and port.isdigit()):  # not "²"
        empty = " or '' (off)" if allow_empty else ""
        raise ConfigError(f"{where}got {shown(value)}; expected 'host:port' like {like!r}{empty}")
    digits = port.lstrip("0") or "0"  # int() of over 4,300 digits raised a bare ValueError
    if len(digits) > 5 or int(digits) > 65535:
        raise ConfigError(
            f"{where}port {cut_text(digits, 20)} in {shown(value)}; expected a port in 0..65535"
        )
    return host, int(digits)


METRICS_ADDRESS = DEFAULTS["metrics.address"]  # the example a bad one is shown (not the endpoint's)


def _metrics_address(value: Any) -> str:
    """``metrics.address``: ``"host:port"`` or ``""`` (no listener), checked by whatever reads
    the config, not only by ``serve``, which binds it."""
    check_address(value, None, allow_empty=True, like=METRICS_ADDRESS)
    return value


class MetricsConfig(ConfigModel):
    """Where ``/metrics`` is served."""

    section: ClassVar[tuple[str, ...]] = ("metrics",)
    address: checked_by(_metrics_address, str) = DEFAULTS["metrics.address"]


def _check_shards_template(value: Any) -> str | None:
    """A shard path template: ``{rank}`` in it (and optionally ``{ranks}``), or None."""
    if value is None or (isinstance(value, str) and "{rank}" in value):
        return no_nul(value)
    raise ValueError(f"got {shown(value)}; expected a path template containing {{rank}}")


class ShardingConfig(ConfigModel):
    """The table split over the ranks of a process group (``ShardedStore``).

    ``shards`` is the shard files' path with ``{rank}`` and ``{ranks}`` in it (relative to the
    YAML); without it, the names ``tiered-store shard`` gives, next to ``table.path``.
    """

    section: ClassVar[tuple[str, ...]] = ("sharding",)
    ranks: int_at_least(1)
    by: Literal["heads", "rows"] = DEFAULTS["sharding.by"]
    shards: checked_by(_check_shards_template, str | None) = None
    backend: Literal["auto", "gloo", "nccl"] = DEFAULTS["sharding.backend"]
    timeout_s: Number = Field(
        default=DEFAULTS["sharding.timeout_s"], gt=0, le=threading.TIMEOUT_MAX
    )


class StoreConfig(ConfigModel):
    """The whole store configuration.

    Examples
    --------
    >>> cfg = StoreConfig.from_dict({"table": {"path": "t.npy"}, "tiers": {"hot": {"capacity": "5%"}}})
    >>> cfg.tiers.hot.capacity, cfg.tiers.warm.policy
    ('5%', 'lru')
    >>> StoreConfig.from_dict({"table": {"path": "t.npy"}, "tiers": {"hot": {"capacity": "lots"}}})
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: config: invalid configuration
      tiers.hot.capacity: got 'lots'; expected a row count (int), a byte size like '512MiB' or '2GiB', or a percentage like '10%'
    """

    table: TableConfig
    tiers: TiersConfig = TiersConfig()
    prefetch: PrefetchConfig = PrefetchConfig()
    metrics: MetricsConfig = MetricsConfig()
    cost_model: CostModelConfig = CostModelConfig()
    sharding: ShardingConfig | None = None

    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        base_dir: Path | None = None,
        source: str | None = "config",
        ignore_unknown: bool = False,
    ) -> StoreConfig:
        """Validate a plain dict; relative paths are resolved against ``base_dir``."""
        cfg = super().from_dict(data, source=source, ignore_unknown=ignore_unknown)
        return cfg._resolve_paths(base_dir, source) if base_dir is not None else cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> StoreConfig:
        """Load and validate a YAML file; errors name the file and the key path."""
        path = Path(expand_home(path))  # its paths are under its folder, ~ read
        data = load_yaml(path, what="config file")
        return cls.from_dict(data, base_dir=config_folder(path), source=str(path))

    def _resolve_paths(self, base_dir: Path, source: str | None) -> StoreConfig:
        """A copy with the table and the tiers' row/profile files resolved against ``base_dir``
        (an error names ``source`` and the key)."""

        def resolve(p: str | None, key: str) -> str | None:
            where = key if source is None else f"{source}: {key}"
            return None if p is None else resolved_under(base_dir, p, where)

        hot, warm = self.tiers.hot, self.tiers.warm
        tiers = self.tiers.model_copy(
            update={
                name: tier.model_copy(
                    update={
                        key: resolve(getattr(tier, key), f"tiers.{name}.{key}")
                        for key in ("static_rows", "preload_rows", "profile")
                    }
                )
                for name, tier in (("hot", hot), ("warm", warm))
            }
        )
        table = self.table.model_copy(update={"path": resolve(self.table.path, "table.path")})
        update = {"table": table, "tiers": tiers}
        if self.sharding is not None and self.sharding.shards is not None:
            update["sharding"] = self.sharding.model_copy(
                update={"shards": resolve(self.sharding.shards, "sharding.shards")}
            )
        return self.model_copy(update=update)
