"""Checkpoint conversion: an Engram model's big tables -> table files, the rest -> a dense file.

A converted checkpoint is a directory::

    engram_layer{L}.npy (+ .manifest.json)   one table file per Engram layer: that layer's
                                             per-head tables concatenated with offsets, exactly
                                             the reference ``multi_head_embedding.embedding``;
                                             the manifest's ``metadata["engram"]`` records the
                                             layout (layer id, head primes, offsets, dim, config)
    dense.safetensors                        every other tensor, in the ``EngramLM`` layout, with
                                             the model configuration in its metadata

One store per Engram layer is the simple layout: each layer's table is its own file and its own
``TieredStore`` with its own memory budget. (A shared budget over layers would need one store
over one concatenated file; the row spaces are independent, so nothing else changes.)

Before anything is written or opened, every shape is checked against the configuration, and a
table file's metadata against the model's Engram layout: a table built for another configuration
(other primes, seed, layer or width) is refused with the field that differs.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic_file import atomic_write, fsync_dir, hidden_temporaries
from ..delta.row_delta import open_delta
from ..delta.table_versions import current_version, open_current_version, release
from ..errors import ConfigError, TableFormatError, TieredStoreError
from ..npy_files import load_npy
from ..quantization import RowQuantization
from ..table_format import (
    RandomSource,
    SafetensorsSource,
    TableExistsError,
    TableManifest,
    TableNotFoundError,
    check_table,
    create_table,
    read_manifest,
    table_paths,
)
from .backend import InMemoryTable
from .config import (  # noqa: F401  (EngramConfig: doctest examples)
    EngramConfig,
    unfinished_conversion,
    v41_refusal,
)
from .hashing import NgramHasher, hasher_for
from .layout import layout_error, table_metadata
from .model import EngramLM, ModelConfig, expected_shapes
from .module import EMBEDDING_KEY, REFERENCE_KEY, check_checkpoint_tensor, is_engram_module_key

__all__ = [
    "DENSE_FILE",
    "ConvertedCheckpoint",
    "check_table_file",
    "convert_checkpoint",
    "expected_checkpoint_shapes",
    "from_reference_layout",
    "load_table_in_memory",
    "load_tiered_model",
    "open_tables",
    "random_tables",
    "save_tiered",
    "table_file",
    "table_metadata",
]

DENSE_FILE = "dense.safetensors"
CONFIG_METADATA_KEY = "tiered_store.model_config"  # safetensors metadata: the ModelConfig as JSON
_TABLE_KEY = re.compile(r"^layers\.(\d+)\.engram\." + re.escape(EMBEDDING_KEY) + "$")


def table_file(directory: str | Path, layer_id: int) -> Path:
    """Path of layer ``layer_id``'s table file in a converted checkpoint directory."""
    return Path(directory) / f"engram_layer{layer_id}.npy"


def _open_shard(config: Any, hasher: NgramHasher, layer_id: int) -> Any:
    """A ``ShardedStore`` over layer ``layer_id``'s table (``sharding:`` in the store section),
    after checking that the shards were cut from a table built for this layer."""
    from ..distributed import ShardedStore

    # a rank whose shard is missing names the whole table when it is missing too
    store = ShardedStore(
        config, missing_table=lambda: missing_table_error(config.table.path, hasher, layer_id)
    )
    try:
        check_table_file(store.path, hasher, layer_id, rows=store.rows)
    except BaseException:
        store.close()
        raise
    return store


def check_table_file(
    path: str | Path,
    hasher: NgramHasher,
    layer_id: int,
    *,
    rows: int | None = None,
    manifest: TableManifest | None = None,
) -> TableManifest:
    """Refuse a table file that was not built for this model's Engram layer ``layer_id``
    (``rows``: the whole table's rows, for a shard of it). A compacted table is checked in its
    current version (the file ``TABLE.npy.current`` names), or in ``manifest``: the version a
    store opened over ``path`` reads.

    Raises
    ------
    ConfigError
        The manifest has no Engram metadata, or a layout fact (layer, rows, dim, head primes,
        hash seed, orders, pad id, tokenizer) differs; the message names the field and both
        values. ``hasher`` is no ``NgramHasher``.
    TableNotFoundError, TableFormatError
        The file or its manifest is missing or malformed.
    """
    hasher = hasher_for(None, hasher)  # before the file is read
    if manifest is None:
        manifest = read_manifest(current_version(path)[0])
    have = manifest.engram_layout
    want = table_metadata(hasher, layer_id)["engram"]
    if not isinstance(have, dict):
        raise ConfigError(
            f"{path}: the table's manifest has no Engram layout metadata; expected a table made "
            f"by convert_checkpoint for Engram layer {layer_id} ({want['rows']:,} x {want['dim']})"
        )
    if (error := layout_error(have, hasher, layer_id, f"{path}: table")) is not None:
        raise error
    if (rows or manifest.rows, manifest.values_per_row) != (want["rows"], want["dim"]):
        raise ConfigError(
            f"{path}: table shape {list(manifest.shape)} does not match its own metadata "
            f"[{want['rows']}, {want['dim']}]"
        )
    return manifest


def random_tables(
    directory: str | Path,
    hasher: NgramHasher,
    *,
    dtype: str = "float32",
    quantization: RowQuantization | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[int, Path]:
    """Seeded random table files for every Engram layer of ``hasher`` (benchmarks, trying out).

    Layer ``L``'s file is ``table_file(directory, L)``, rows drawn with seed ``L``: normal values
    of ``dtype``, or packed rows of random fp8 codes and scales with ``quantization``. A file
    already there whose layout (``check_table_file``), dtype and quantisation match is reused;
    ``create_table`` refuses one that would not fit the disk. ``log`` hears of each file made.

    Examples
    --------
    >>> import tempfile
    >>> cfg = EngramConfig(engram_vocab_size=(2003, 3001), n_embed_per_ngram=64,
    ...                    n_head_per_ngram=4, layer_ids=(1, 4))
    >>> d = tempfile.mkdtemp()
    >>> paths = random_tables(d, NgramHasher(cfg))
    >>> sorted(paths), read_manifest(paths[4]).shape
    ([1, 4], (20372, 16))
    >>> random_tables(d, NgramHasher(cfg)) == paths  # reused
    True
    """
    hasher = hasher_for(None, hasher)  # before the folder is made
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    width = quantization.packed_bytes if quantization else hasher.config.head_dim
    stored = "uint8" if quantization else dtype
    paths = {}
    for layer in hasher.layer_ids:
        path = table_file(directory, layer)
        try:
            manifest = check_table_file(path, hasher, layer)
            reusable = manifest.dtype == stored and manifest.quantization == quantization
        except (TieredStoreError, OSError):
            reusable = False
        if not reusable:
            rows = hasher.table_rows(layer)
            if log is not None:
                log(f"creating {path} ({rows:,} x {width} {stored}) ...")
            source = RandomSource(rows, width, stored, seed=layer, quantization=quantization)
            create_table(
                path, source, metadata=table_metadata(hasher, layer), overwrite=True, progress=False
            )
        paths[layer] = path
    return paths


class _ShapesOnly(torch.overrides.TorchFunctionMode):
    """Builds a model on the meta device without the ops whose meta kernels import
    ``torch._dynamo`` (seconds of every converting process): ``normal_`` (a random init, which
    writes nothing there) is skipped, ``eye`` made as an empty tensor of its shape."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.eye:
            n = args[0] if args else kwargs.pop("n")
            m = args[1] if len(args) > 1 else kwargs.pop("m", n)
            return torch.empty(n, m, **kwargs)
        if getattr(func, "__name__", None) == "normal_":
            return args[0] if args else kwargs["tensor"]  # the tensor, left as it is
        return func(*args, **kwargs)


def expected_checkpoint_shapes(config: ModelConfig, hasher: NgramHasher) -> dict[str, tuple]:
    """Every key of an ``EngramLM`` state_dict for ``config`` with its shape (nothing allocated)."""
    with torch.device("meta"), _ShapesOnly():
        model = EngramLM(config, hasher=hasher)
    return expected_shapes(model)


def from_reference_layout(
    source: str | Path | Mapping[str, torch.Tensor], layer_ids: tuple[int, ...] | list[int]
) -> dict[str, torch.Tensor]:
    """Engram modules saved per layer (``layer{L}.<param>``, the reference/golden layout) ->
    ``EngramLM`` keys (``layers.{L}.engram.<param>``). Other keys are left out.

    Examples
    --------
    >>> sd = from_reference_layout("tests/data/golden/engram_forward.safetensors", [1, 4])
    >>> sorted(sd)[0], tuple(sd["layers.4.engram." + EMBEDDING_KEY].shape)
    ('layers.1.engram.key_projs.0.bias', (20372, 16))
    """
    from .module import split_checkpoint

    out: dict[str, torch.Tensor] = {}
    for layer_id in layer_ids:
        weight, dense = split_checkpoint(source, layer_id)
        prefix = f"layers.{layer_id}.engram."
        out[prefix + EMBEDDING_KEY] = weight
        out.update({prefix + k: v for k, v in dense.items()})
    return out


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """Where a converted checkpoint's files are, and the configuration they were made for."""

    directory: Path
    config: ModelConfig
    dense_path: Path
    table_paths: dict[int, Path]


def convert_checkpoint(
    source: str | Path | Mapping[str, torch.Tensor],
    config: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    strict: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    hasher: NgramHasher | None = None,
) -> ConvertedCheckpoint:
    """Split an ``EngramLM`` checkpoint into one table file per Engram layer and a dense file.

    Parameters
    ----------
    source
        A ``.safetensors`` file (tables are streamed from it in slices) or a state_dict, in the
        ``EngramLM`` layout (``layers.{L}.engram.multi_head_embedding.embedding.weight`` for the
        tables). For per-layer reference checkpoints use ``from_reference_layout`` first.
    config
        The model configuration the checkpoint must match.
    out_dir
        Directory for ``engram_layer{L}.npy`` files and ``dense.safetensors`` (created).
    dtype
        Table dtype on disk (``"float32"``, ``"float16"``, ``"bfloat16"``); default: as stored.
    strict
        Every key of the model must be present (``False``: only the tables must be, e.g. an
        Engram-only checkpoint). Unknown keys and wrong shapes are errors either way.
    overwrite
        Replace an existing checkpoint (its dense file and table files); without it, a dense
        file there is refused before anything is written.
    progress
        tqdm progress bars while writing tables.
    hasher
        Shared ``NgramHasher`` (default: a new one).

    Returns
    -------
    ConvertedCheckpoint

    Raises
    ------
    ConfigError
        A shape disagrees with ``config`` (the key, both shapes and the config facts are named),
        a key is unknown, a value is no tensor (a table's may be a NumPy array), or (strict) a
        key is missing; or ``config`` has DeepSeek-V4.1's geometry (``tiered-store convert-hf``
        converts those). Checked before anything is written.
    TableExistsError
        ``out_dir`` holds a checkpoint (its ``dense.safetensors``, or a table file) and not
        ``overwrite``.

    Examples
    --------
    >>> cfg = ModelConfig.from_dict({"engram": {"engram_vocab_size": [2003, 3001],
    ...     "n_embed_per_ngram": 64, "n_head_per_ngram": 4, "layer_ids": [1]},
    ...     "backbone": {"hidden_size": 64, "num_layers": 2}})
    >>> model = EngramLM(cfg)
    >>> out = convert_checkpoint(model.state_dict(), cfg, "/tmp/ckpt", overwrite=True)  # doctest: +SKIP
    >>> tiered = load_tiered_model("/tmp/ckpt", store={"tiers": {"warm": {"capacity": "25%"}}})  # doctest: +SKIP
    """
    if config.engram.is_v41:  # an EngramLM keeps them outside its state_dict
        raise ConfigError(
            f"config: engram.geometry {v41_refusal('convert_checkpoint cannot write')}; a "
            "DeepSeek-V4.1 checkpoint converts with `tiered-store convert-hf`"
        )
    hasher = hasher_for(config.engram, hasher, "config.engram has")
    entries = _entries(source)
    expected = expected_checkpoint_shapes(config, hasher)
    _check_entries(entries, expected, config, strict)
    out = Path(out_dir)
    dense_path = out / DENSE_FILE  # written last: its presence marks a complete checkpoint
    if not overwrite and dense_path.exists():  # another checkpoint's weights and config
        raise TableExistsError(
            errno.EEXIST,
            f"{dense_path} already exists: {out} holds a converted checkpoint; pass "
            "overwrite=True to replace it (its dense weights, model config and tables)",
            str(dense_path),
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in hidden_temporaries(out, re.escape(DENSE_FILE)):  # a killed conversion's
        stale.unlink(missing_ok=True)
    if overwrite and dense_path.exists():  # so a conversion stopped midway leaves none
        dense_path.unlink()
        fsync_dir(out)
    paths = {}
    for layer_id in config.engram.layer_ids:
        key = f"layers.{layer_id}.engram.{EMBEDDING_KEY}"
        paths[layer_id] = table_file(out, layer_id)
        create_table(
            paths[layer_id],
            entries.pop(key).source,
            dtype=dtype,
            progress=progress,
            overwrite=overwrite,
            metadata=table_metadata(hasher, layer_id),
        )
    _save_dense(dense_path, {k: e.load() for k, e in entries.items()}, config)
    return ConvertedCheckpoint(out, config, dense_path, paths)


def save_tiered(
    model: EngramLM,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ConvertedCheckpoint:
    """Convert a live ``EngramLM`` (in-memory tables) into a checkpoint directory; ConfigError
    for a table whose rows are not the state_dict's table key (a tiered store, outside it:
    already a file)."""
    state = model.state_dict()
    for layer_id, table in model.tables.items():
        key = f"layers.{layer_id}.engram.{EMBEDDING_KEY}"
        if not model.config.engram.is_v41 and key not in state:
            raise ConfigError(
                f"model.tables[{layer_id}]: a {type(table).__name__}, whose rows the model's "
                f"state_dict holds under no {key}; expected an InMemoryTable, whose rows "
                "save_tiered writes to a table file (a tiered store's table is one already: "
                "load_table_in_memory reads it in)"
            )
    return convert_checkpoint(
        state,
        model.config,
        out_dir,
        dtype=dtype,
        overwrite=overwrite,
        progress=progress,
        hasher=model.hasher,
    )


def load_table_in_memory(path: str | Path) -> InMemoryTable:
    """A table file read whole into RAM as a frozen ``InMemoryTable`` (same dtype, same bits):
    its current version, with the rows committed to it since (its write delta), telling the
    Engram layout the file records (``engram_layout``), which a model checks.

    Examples
    --------
    >>> table = load_table_in_memory("/tmp/ckpt/engram_layer1.npy")  # doctest: +SKIP
    >>> table.rows, table.dim, table.weight.dtype  # doctest: +SKIP
    (20112, 16, torch.float32)
    """
    # held while read: a compaction meanwhile leaves this version (and its delta) in place
    (version, manifest, data), _, hold = open_current_version(path, _read_version)
    try:
        delta = open_delta(version, data.itemsize * data.shape[1])
        if delta is not None:  # rows committed since this version was made
            try:
                for ids, rows in delta.iter_rows():
                    data[ids] = np.ascontiguousarray(rows).view(data.dtype).reshape(len(ids), -1)
            finally:
                delta.close()
    finally:
        release(hold)
    if manifest.dtype == "bfloat16":  # stored as raw uint16 bits
        tensor = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(data)
    return InMemoryTable(tensor, engram_layout=manifest.engram_layout)


def _read_version(path: Path) -> tuple[Path, TableManifest, np.ndarray]:
    """A table version's path, manifest and rows (checked, read whole)."""
    return path, check_table(path), load_npy(table_paths(path)[0])


StoreSpec = Mapping[str, Any] | Callable[[int], Mapping[str, Any]]


def open_tables(
    table_paths: Mapping[int, str | Path],
    hasher: NgramHasher,
    store: StoreSpec | None = None,
    *,
    warm_start: Mapping[int, np.ndarray] | None = None,
) -> dict[int, Any]:
    """Open one ``TieredStore`` per Engram layer, after checking each file's layout.

    Parameters
    ----------
    table_paths
        ``{layer_id: table .npy}`` (``ConvertedCheckpoint.table_paths``).
    hasher
        The model's ``NgramHasher`` (its layout is what the files must match).
    store
        The store configuration without its ``table`` section (``tiers``, ``prefetch``, ...), as
        in a tiers YAML; or a function ``layer_id -> that mapping`` for per-layer settings.
        Relative paths in it (``preload_rows``) resolve against the current directory.
    warm_start
        ``{layer_id: row ids, hottest first}`` (e.g. ``profile_rows`` over earlier traffic): the
        hot and the warm tier each preload the hottest rows up to their capacity.
        The lists are written next to each table (``engram_layer{L}.{hot,warm}_rows.npy``).

    Returns
    -------
    dict
        ``{layer_id: TieredStore}``; close them (or ``EngramLM.close()``) when done.

    Examples
    --------
    >>> stores = open_tables(converted.table_paths, model.hasher,
    ...                      {"tiers": {"hot": {"capacity": "5%"}, "warm": {"capacity": "20%"},
    ...                                 "cold": {"io": "direct"}}})  # doctest: +SKIP
    >>> model.set_tables(stores)  # doctest: +SKIP
    """
    from ..config import StoreConfig, naming_file
    from ..store import TieredStore

    hasher = hasher_for(None, hasher)  # before any store opens
    stores: dict[int, Any] = {}
    try:
        for layer_id, path in table_paths.items():
            spec = dict(store(layer_id) if callable(store) else (store or {}))
            if "table" in spec:
                raise ConfigError(
                    "store.table: set by the checkpoint (one table file per Engram layer); "
                    "expected only tiers/prefetch/metrics"
                )
            spec["table"] = {"path": str(Path(path).resolve())}
            source = f"store (layer {layer_id})"
            config = StoreConfig.from_dict(spec, base_dir=Path.cwd(), source=source)
            if config.sharding is not None:  # this rank's shard of the layer's table
                with naming_file(source):  # errors at open name the layer, as the section's do
                    stores[layer_id] = _open_shard(config, hasher, layer_id)
                continue
            try:
                manifest = check_table_file(path, hasher, layer_id)
            except TableNotFoundError:
                if (missing := missing_table_error(path, hasher, layer_id)) is not None:
                    raise missing from None
                raise  # a version or a manifest gone: said so
            if warm_start is not None and layer_id in warm_start:
                spec = _with_preload(spec, manifest, Path(path), warm_start[layer_id])
                config = StoreConfig.from_dict(spec, base_dir=Path.cwd(), source=source)
            with naming_file(source):
                stores[layer_id] = TieredStore(config)
    except BaseException:
        for opened in stores.values():
            opened.close()
        raise
    return stores


def missing_table_error(
    path: str | Path, hasher: NgramHasher, layer_id: int
) -> TableNotFoundError | None:
    """The error for layer ``layer_id``'s table when no file of it exists, naming what writes a
    checkpoint's tables; None when it exists (a version or a manifest of it gone: its own error)."""
    version, generation = current_version(path)
    if generation or version.exists():
        return None
    if hasher.config.is_v41:
        maker = "`tiered-store convert-hf` from the DeepSeek-V4.1 checkpoint"
    else:
        maker = (
            "convert_checkpoint or save_tiered (`tiered-store init-model CONFIG` writes a small "
            "random checkpoint)"
        )
    return TableNotFoundError(
        errno.ENOENT,
        f"Engram layer {layer_id}: table {path} does not exist; expected the table a checkpoint "
        f"holds for it, made by {maker}",
        str(path),
    )


def load_tiered_model(
    directory: str | Path,
    *,
    store: StoreSpec | None = None,
    hasher: NgramHasher | None = None,
    strict: bool = True,
) -> EngramLM:
    """An ``EngramLM`` whose Engram tables are tiered stores over a converted checkpoint.

    The configuration comes from the dense file's metadata; the dense weights are loaded
    (``strict=False`` accepts a partial checkpoint, e.g. Engram modules only); each table file's
    layout is checked before its store opens. Call ``model.close()`` when done.
    """
    directory = Path(directory)
    dense, config = _load_dense(directory / DENSE_FILE)
    # not the tables' fault: said before any store opens
    hasher = hasher_for(
        config.engram, hasher, f"the checkpoint {directory / DENSE_FILE} was made with"
    )
    paths = {layer_id: table_file(directory, layer_id) for layer_id in config.engram.layer_ids}
    stores = open_tables(paths, hasher, store)
    try:
        model = EngramLM(config, hasher=hasher, tables=stores)
        if strict:
            _check_dense_keys(directory / DENSE_FILE, dense, model)
        model.load_state_dict(dense, strict=strict)
    except BaseException:
        for opened in stores.values():
            opened.close()
        raise
    return model


# -- internals ------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One checkpoint tensor: its shape now, its data (or a streaming source) on demand."""

    shape: tuple[int, ...] | None  # None: a value with none (a list), refused by its check
    source: Any  # a tensor, or SafetensorsSource for file-backed entries

    def load(self) -> torch.Tensor:
        """The tensor itself."""
        if isinstance(self.source, SafetensorsSource):
            from safetensors import safe_open

            with safe_open(str(self.source.path), framework="pt") as f:
                return f.get_tensor(self.source.tensor_name)
        return self.source


def _entries(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, _Entry]:
    """Key -> _Entry for a state_dict or a safetensors file (file tensors are not read yet)."""
    if isinstance(source, Mapping):
        return {
            k: _Entry(tuple(v.shape) if hasattr(v, "shape") else None, v) for k, v in source.items()
        }
    from safetensors import SafetensorError, safe_open

    path = Path(source)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                k: _Entry(tuple(f.get_slice(k).get_shape()), SafetensorsSource(path, k))
                for k in list(f.keys())
            }
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{path}: cannot read the checkpoint: {exc}") from exc


def _check_entries(
    entries: Mapping[str, _Entry], expected: Mapping[str, tuple], config: ModelConfig, strict: bool
) -> None:
    """Unknown keys, values that are no tensor (a table's may be an array), wrong shapes and
    (strict) missing keys -> ConfigError, before any write."""
    for key, entry in entries.items():
        if key not in expected:
            hint = ""
            reference = REFERENCE_KEY.match(key)
            if reference and is_engram_module_key(reference.group(2)):
                hint = " (a per-layer reference checkpoint: convert from_reference_layout(...))"
            raise ConfigError(f"{key}: not a key of this EngramLM's state_dict{hint}")
        table = isinstance(entry.source, np.ndarray) and key.endswith(f".engram.{EMBEDDING_KEY}")
        if not isinstance(entry.source, SafetensorsSource) and not table:  # (create_table's)
            check_checkpoint_tensor(key, entry.source, expected[key])
        if entry.shape != expected[key]:
            bb, tc, eng = config.backbone, config.transformer, config.engram
            raise ConfigError(
                f"{key}: checkpoint shape {list(entry.shape)} does not match {list(expected[key])} "
                f"expected from the config (hidden_size={bb.hidden_size}, hc_mult={bb.hc_mult}, "
                f"num_layers={bb.num_layers}, vocab_size={bb.vocab_size}, intermediate_size="
                f"{tc.mlp_size(bb.hidden_size)}, engram_vocab_size={list(eng.engram_vocab_size)}, "
                f"n_head_per_ngram={eng.n_head_per_ngram}, n_embed_per_ngram="
                f"{eng.n_embed_per_ngram}, layer_ids={list(eng.layer_ids)})"
            )
    for layer_id in config.engram.layer_ids:
        key = f"layers.{layer_id}.engram.{EMBEDDING_KEY}"
        if key not in entries:
            raise ConfigError(
                f"{key}: missing from the checkpoint (Engram layer {layer_id}'s table)"
            )
    if strict:
        missing = sorted(set(expected) - set(entries))
        if missing:
            raise ConfigError(
                f"{missing[0]}: missing from the checkpoint ({len(missing)} keys missing; "
                "strict=False converts a partial checkpoint)"
            )


def _save_dense(path: Path, tensors: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Write the dense tensors with the model configuration in the file's metadata, atomically
    and readable as the table files are (the mode a new file gets under the umask)."""
    from safetensors.torch import save

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(config.to_dict())}
    # bytes written through atomic_write: save_file would make a temporary of its own (owner-only,
    # named as no clean-up knows) and rename it over ours
    data = save(contiguous, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)


def _check_dense_keys(path: Path, dense: Mapping[str, torch.Tensor], model: EngramLM) -> None:
    """ConfigError naming ``path`` and the first key of ``model`` the dense file lacks, or of the
    file ``model`` lacks (torch's load_state_dict raises a RuntimeError naming neither the file)."""
    expected = model.state_dict().keys()
    missing = sorted(expected - dense.keys())
    if missing:
        raise ConfigError(
            f"{path}: {missing[0]}: missing from the dense checkpoint ({len(missing)} keys "
            "missing); a partial checkpoint (converted with strict=False) loads only with "
            "load_tiered_model(..., strict=False)"
        )
    unexpected = sorted(dense.keys() - expected)
    if unexpected:
        raise ConfigError(
            f"{path}: {unexpected[0]}: not a key of this EngramLM's state_dict "
            f"({len(unexpected)} unknown keys); expected the dense file convert_checkpoint "
            "writes for the model configuration in its metadata"
        )


def _refuse_a_conversion(folder: Path) -> None:
    """A ``convert-hf`` output, finished or not, is the Engram weights alone, not a whole model:
    say so, and what opens its tables; any other folder passes."""
    unfinished = unfinished_conversion(folder)
    if unfinished is None and not (folder / "config.json").is_file():
        return
    what = (
        f"{folder} is a DeepSeek-V4.1 conversion (`tiered-store convert-hf`): it"
        if unfinished is None
        else f"{unfinished}; even finished, it"
    )
    raise TableFormatError(
        f"{what} holds the Engram tables and weights, not a whole model, so it cannot be served "
        "or loaded as one; open each layer's table with TieredStore.open("
        f"'{folder}/layer<L>.yaml') as the model's table backend (README, DeepSeek-V4.1)"
    )


def _load_dense(path: Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Dense tensors and the ModelConfig stored with them."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    except (OSError, SafetensorError) as exc:
        if unfinished_conversion(path.parent) is not None:  # killed before it wrote this file
            _refuse_a_conversion(path.parent)
        raise ConfigError(
            f"{path}: cannot read the dense checkpoint ({exc}); expected a directory made by "
            "convert_checkpoint"
        ) from exc
    if CONFIG_METADATA_KEY not in meta:
        _refuse_a_conversion(path.parent)
        raise TableFormatError(
            f"{path}: no {CONFIG_METADATA_KEY!r} metadata; not made by convert_checkpoint"
        )
    try:
        config = ModelConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY]))
    except (json.JSONDecodeError, TieredStoreError) as exc:
        raise TableFormatError(
            f"{path}: model configuration in the metadata is invalid: {exc}"
        ) from exc
    return tensors, config


def _with_preload(
    spec: dict[str, Any], manifest: TableManifest, path: Path, hottest: np.ndarray
) -> dict[str, Any]:
    """``spec`` with hot and warm ``preload_rows``: each tier the hottest rows it can hold.

    Inclusive, like the store's steady state: cold reads are admitted into both tiers, so a row
    the hot tier evicts is usually still warm."""
    from ..capacity import resolve_capacity

    tiers = {k: dict(v) for k, v in (spec.get("tiers") or {}).items()}
    for tier in ("hot", "warm"):
        section = tiers.setdefault(tier, {})
        capacity = resolve_capacity(
            section.get("capacity", 0),
            table_rows=manifest.rows,
            row_bytes=manifest.row_bytes,
            key=f"tiers.{tier}.capacity",
        )
        rows = np.asarray(hottest[:capacity], dtype=np.int64)
        if capacity and rows.size:
            target = path.with_name(f"{path.stem}.{tier}_rows.npy")
            np.save(target, rows)
            section["preload_rows"] = str(target)
    return {**spec, "tiers": tiers}
