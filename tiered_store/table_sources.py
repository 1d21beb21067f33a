"""Where a table's rows come from when it is created: arrays, ``.npy`` files, safetensors tensors
(plain, or fp8 codes + scales packed into quantised rows) and seeded random initialisation.

Every source is wrapped in a reader that yields row chunks in the table's on-disk layout, so
:func:`~tiered_store.table_format.create_table` streams any of them in bounded memory.
"""

from __future__ import annotations

import contextlib
import errno
import math
import numbers
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic_file import special_kind
from .errors import TableFormatError, TierIOError, shown
from .integers import as_integer
from .npy_files import load_npy
from .quantization import RowQuantization, pack_rows

__all__ = [
    "TABLE_DTYPES",
    "PackedSafetensorsSource",
    "RandomSource",
    "SafetensorsSource",
    "TableSource",
    "dtype_name",
    "open_source",
]

RANDOM_UNIT_ELEMENTS = 1 << 20  # RandomSource draws 1 Mi elements per seeded unit of rows
RANDOM_SCALE_BYTES = (120, 135)  # quantised RandomSource: scales 2^-7 .. 2^8 (bytes inclusive)
# RandomSource refuses a std whose draws could overflow the dtype: none is past this many std
# (a normal draw is past 10 std with probability 1.5e-23)
RANDOM_STD_SIGMAS = 10
FLOAT_MAX = {
    name: float(torch.finfo(getattr(torch, name)).max)
    for name in ("float32", "float16", "bfloat16")
}

# dtype name -> (on-disk .npy descr, bytes per element, torch dtype)
TABLE_DTYPES: dict[str, tuple[str, int, torch.dtype]] = {
    "float32": ("<f4", 4, torch.float32),
    "float16": ("<f2", 2, torch.float16),
    "bfloat16": ("<u2", 2, torch.bfloat16),
    "uint8": ("|u1", 1, torch.uint8),  # packed quantised rows (see tiered_store.quantization)
}
_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "f4": "float32",
    "<f4": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "f2": "float16",
    "<f2": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "uint8": "uint8",
    "u1": "uint8",
    "|u1": "uint8",
}


class TableNotFoundError(TierIOError, FileNotFoundError):
    """A table file, its manifest, or a source file does not exist."""


@dataclass(frozen=True)
class SafetensorsSource:
    """A 2-D tensor stored under ``tensor_name`` in a ``.safetensors`` file (read in slices)."""

    path: str | os.PathLike[str]
    tensor_name: str


@dataclass(frozen=True)
class RandomSource:
    """Seeded normal(0, std) initialisation; the values depend only on (rows, dim, seed, std).

    Rows are drawn in float32 in units of about 1 Mi elements, each unit from its own
    ``SeedSequence(seed, spawn_key=(unit,))``, then cast to the table dtype, so the result does
    not depend on ``chunk_bytes``.

    With ``quantization``, rows are packed quantised rows instead (``dtype`` is ``uint8`` and
    ``dim`` the packed width): fp8 codes drawn uniformly from the finite e4m3 codes and scale
    bytes from ``RANDOM_SCALE_BYTES``, the same way per unit of rows.
    """

    rows: int
    dim: int
    dtype: str = "float32"
    seed: int = 0
    std: float = 1.0
    quantization: RowQuantization | None = None


@dataclass(frozen=True)
class PackedSafetensorsSource:
    """Quantised rows from two tensors of a checkpoint: fp8 codes ``[rows, values]``
    (``F8_E4M3``) and their ue8m0 scales ``[rows, values / block]`` (``F8_E8M0``), possibly in
    different shard files, packed row by row as the table stores them.

    Examples
    --------
    >>> src = PackedSafetensorsSource(
    ...     SafetensorsSource("model-00001.safetensors", "layers.1.engram.embed.weight"),
    ...     SafetensorsSource("model-00002.safetensors", "layers.1.engram.embed.scale"),
    ... )
    """

    codes: SafetensorsSource
    scales: SafetensorsSource


TableSource = (
    np.ndarray
    | torch.Tensor
    | str
    | os.PathLike
    | SafetensorsSource
    | PackedSafetensorsSource
    | RandomSource
)


def dtype_name(value: object, what: str) -> str:
    """Normalise a dtype given as str / torch.dtype / NumPy dtype to a TABLE_DTYPES key."""
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        name = value.lower()
    else:
        try:
            name = np.dtype(value).name  # type: ignore[call-overload]
        except TypeError:
            name = repr(value)
    if name in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[name]
    raise TableFormatError(
        f"{what} is {value!r}; expected one of float32, float16, bfloat16, uint8 "
        "(or a torch/NumPy equivalent)"
    )


class SourceReader:
    """Uniform chunked access to a table source: shape, dtypes, description, ``rows(a, b)``."""

    rows: int
    dim: int
    dtype: str  # target table dtype
    description: str
    quantization: RowQuantization | None = None  # set by sources of packed quantised rows
    unit_rows: int = 1  # chunks are rounded to a multiple of this when possible

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a C-contiguous array of the on-disk dtype."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files held by the source."""


def _check_shape(shape: tuple[int, ...], what: str) -> tuple[int, int]:
    """Validate a 2-D, non-empty shape; return (rows, dim)."""
    if len(shape) != 2:
        raise TableFormatError(f"{what} has shape {tuple(shape)} (ndim {len(shape)}); expected 2-D")
    rows, dim = int(shape[0]), int(shape[1])
    if rows < 1 or dim < 1:
        raise TableFormatError(f"{what} has shape {(rows, dim)}; expected rows >= 1 and dim >= 1")
    return rows, dim


def _to_disk(chunk: np.ndarray | torch.Tensor, src_kind: str, dtype: str) -> np.ndarray:
    """Convert a chunk of source kind ``src_kind`` (a dtype name, or 'bf16bits') to disk layout."""
    descr = TABLE_DTYPES[dtype][0]
    if isinstance(chunk, np.ndarray):
        if src_kind == "bf16bits":  # _pick_dtype allows these only for bfloat16 tables
            return np.ascontiguousarray(chunk, dtype="<u2")
        if chunk.dtype.str == descr:
            return np.ascontiguousarray(chunk)
        else:
            chunk = torch.from_numpy(np.array(chunk, dtype=chunk.dtype.newbyteorder("=")))
    t = chunk.detach().to("cpu", TABLE_DTYPES[dtype][2]).contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view("<u2")
    return t.numpy()


_CONVERTIBLE = {"float64", "float32", "float16", "bfloat16"}


def _pick_dtype(src_kind: str, requested: object, what: str) -> str:
    """Table dtype from the source kind and the ``dtype`` argument, with clear refusals."""
    if requested is not None:
        target = dtype_name(requested, "dtype")
        if target == src_kind:
            return target
        if target == "uint8" or src_kind == "uint8":
            raise TableFormatError(
                f"{what} has dtype {src_kind} but dtype={target!r} was requested; uint8 tables "
                "hold packed quantised rows (tiered_store.quantization.quantize_rows makes them)"
            )
        if src_kind == "bf16bits" and target != "bfloat16":
            raise TableFormatError(
                f"{what} is uint16 (raw bfloat16 bits) but dtype={target!r} was requested; "
                "expected dtype='bfloat16' for uint16 sources"
            )
        if src_kind not in _CONVERTIBLE and src_kind != "bf16bits":
            raise TableFormatError(
                f"{what} has dtype {src_kind}; expected a floating dtype "
                "(float64, float32, float16, bfloat16)"
            )
        return target
    if src_kind in TABLE_DTYPES:
        return src_kind
    if src_kind == "bf16bits":
        raise TableFormatError(
            f"{what} has dtype uint16; pass dtype='bfloat16' if it holds raw bfloat16 bits"
        )
    convert = " (pass dtype= to convert it)" if src_kind == "float64" else ""
    raise TableFormatError(
        f"{what} has dtype {src_kind}; expected float32, float16 or bfloat16{convert}"
    )


class _ArrayReader(SourceReader):
    """In-memory NumPy array / torch tensor, or a memory-mapped ``.npy``."""

    def __init__(self, data: np.ndarray | torch.Tensor, what: str, dtype: object, desc: str):
        self.data = data
        self.rows, self.dim = _check_shape(tuple(data.shape), what)
        if isinstance(data, torch.Tensor):
            self.kind = str(data.dtype).removeprefix("torch.")
        elif data.dtype.kind == "u" and data.dtype.itemsize == 2:
            self.kind = "bf16bits"
        elif data.dtype.kind == "f":
            self.kind = data.dtype.name
        else:
            self.kind = str(data.dtype)
        self.dtype = _pick_dtype(self.kind, dtype, what)
        self.description = desc

    def read(self, start: int, stop: int) -> np.ndarray:
        return _to_disk(self.data[start:stop], self.kind, self.dtype)

    def close(self) -> None:
        self.data = None  # type: ignore[assignment]  # drop the mmap


def _open_tensor(src: SafetensorsSource) -> tuple[Any, Any]:
    """``(open file, tensor slice)`` of one safetensors tensor, read lazily with ``get_slice``."""
    from safetensors import safe_open

    path = Path(src.path)
    if path.is_dir():
        raise TableFormatError(f"safetensors source file {path} is a directory; expected a file")
    if not path.is_file():
        raise TableNotFoundError(
            errno.ENOENT, f"safetensors source file {path} does not exist", str(path)
        )
    try:
        file = safe_open(str(path), framework="pt")
        handle = file.__enter__()
    except Exception as exc:  # safetensors raises its own error types
        raise TableFormatError(f"safetensors source {path} cannot be opened: {exc}") from None
    names = list(handle.keys())
    if src.tensor_name not in names:
        file.__exit__(None, None, None)
        shown = ", ".join(repr(n) for n in sorted(names)[:50])
        more = f" ... and {len(names) - 50} more" if len(names) > 50 else ""
        raise TableFormatError(
            f"safetensors source {path} has no tensor {src.tensor_name!r}; available: {shown}{more}"
        )
    return file, handle.get_slice(src.tensor_name)


class _SafetensorsReader(SourceReader):
    """One tensor of a safetensors file, read with ``get_slice`` (no full load)."""

    _KINDS = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "U8": "uint8",
    }

    def __init__(self, src: SafetensorsSource, dtype: object):
        self._file, self._slice = _open_tensor(src)
        path = Path(src.path)
        what = f"tensor {src.tensor_name!r} in {path}"
        try:
            self.rows, self.dim = _check_shape(tuple(self._slice.get_shape()), what)
            st_dtype = self._slice.get_dtype()
            self.kind = self._KINDS.get(st_dtype, st_dtype)
            self.dtype = _pick_dtype(self.kind, dtype, what)
        except TableFormatError:
            self.close()
            raise
        self.description = f"safetensors:{path.name}#{src.tensor_name}"

    def read(self, start: int, stop: int) -> np.ndarray:
        return _to_disk(self._slice[start:stop], self.kind, self.dtype)

    def close(self) -> None:
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = None


class _PackedSafetensorsReader(SourceReader):
    """fp8 codes and ue8m0 scales from two safetensors tensors, packed row by row."""

    def __init__(self, src: PackedSafetensorsSource, dtype: object):
        if dtype is not None and dtype_name(dtype, "dtype") != "uint8":
            raise TableFormatError(
                f"dtype={dtype!r} for quantised rows; expected uint8 (packed codes + scales)"
            )
        self._files: list[Any] = []
        try:
            self._codes = self._open(src.codes, "F8_E4M3")
            self._scales = self._open(src.scales, "F8_E8M0")
            rows, values = self._codes.get_shape()
            scale_rows, scales = self._scales.get_shape()
            if scale_rows != rows or values % scales:
                raise TableFormatError(
                    f"scales {src.scales.tensor_name!r} [{scale_rows}, {scales}] do not fit codes "
                    f"{src.codes.tensor_name!r} [{rows}, {values}]; expected [{rows}, "
                    f"{values} / block] with one scale per block of columns"
                )
            self.quantization = RowQuantization(values=values, block=values // scales)
        except BaseException:
            self.close()
            raise
        self.rows, self.dim, self.dtype = rows, self.quantization.packed_bytes, "uint8"
        self.description = (
            f"safetensors:{Path(src.codes.path).name}#{src.codes.tensor_name}"
            f" + {Path(src.scales.path).name}#{src.scales.tensor_name}"
        )

    def _open(self, src: SafetensorsSource, expected: str) -> Any:
        """The tensor's slice, refused unless it is 2-D of the ``expected`` safetensors dtype."""
        file, tensor = _open_tensor(src)
        self._files.append(file)
        what = f"tensor {src.tensor_name!r} in {src.path}"
        _check_shape(tuple(tensor.get_shape()), what)
        if tensor.get_dtype() != expected:
            raise TableFormatError(f"{what} has dtype {tensor.get_dtype()}; expected {expected}")
        return tensor

    def read(self, start: int, stop: int) -> np.ndarray:
        codes = self._codes[start:stop].view(torch.uint8).numpy()
        return pack_rows(codes, self._scales[start:stop].view(torch.uint8).numpy())

    def close(self) -> None:
        for file in self._files:
            file.__exit__(None, None, None)
        self._files = []


class _RandomReader(SourceReader):
    """Seeded normal rows, generated per fixed unit of rows so chunking never changes values."""

    def __init__(self, src: RandomSource, dtype: object):
        for name in ("rows", "dim"):  # int() would cut 10.7 rows to 10, or parse a str
            if as_integer(getattr(src, name)) is None:
                raise TableFormatError(
                    f"RandomSource {name}={getattr(src, name)!r}; expected an integer >= 1"
                )
        what = f"RandomSource{(src.rows, src.dim)}"
        self.rows, self.dim = _check_shape((as_integer(src.rows), as_integer(src.dim)), what)
        self.seed = as_integer(src.seed)
        if self.seed is None or self.seed < 0:
            raise TableFormatError(f"RandomSource seed={src.seed!r}; expected an integer >= 0")
        std = math.nan  # a NumPy float is a number; True is no std of 1; 10**400 not finite
        if isinstance(src.std, numbers.Real) and not isinstance(src.std, bool):
            with contextlib.suppress(OverflowError):
                std = float(src.std)
        if not (math.isfinite(std) and std >= 0):
            raise TableFormatError(
                f"RandomSource std={shown(src.std)}; expected a finite number >= 0"
            )
        self.dtype = dtype_name(src.dtype if dtype is None else dtype, "dtype")
        if self.dtype in FLOAT_MAX and std > FLOAT_MAX[self.dtype] / RANDOM_STD_SIGMAS:
            raise TableFormatError(
                f"RandomSource std={std:g} with dtype {self.dtype}: draws would overflow "
                f"{self.dtype} (largest finite {FLOAT_MAX[self.dtype]:.6g}) to inf; expected std "
                f"<= {FLOAT_MAX[self.dtype] / RANDOM_STD_SIGMAS:.6g}"
            )
        self.quantization = src.quantization
        if self.quantization is not None and (
            self.dtype != "uint8" or self.dim != self.quantization.packed_bytes
        ):
            raise TableFormatError(
                f"{what} dtype {self.dtype} with quantization {self.quantization.to_json()}; "
                f"expected dtype uint8 and dim {self.quantization.packed_bytes} (packed row)"
            )
        self.src = src
        self.unit_rows = max(1, RANDOM_UNIT_ELEMENTS // self.dim)
        self._cached: tuple[int, np.ndarray] = (-1, np.empty((0, self.dim), np.float32))
        kind = "packed fp8 rows" if self.quantization else f"normal(mean=0, std={src.std})"
        self.description = f"random {kind}, seed={self.seed}"

    def _unit(self, u: int) -> np.ndarray:
        if self._cached[0] == u:  # small chunks reuse the unit they share
            return self._cached[1]
        start = u * self.unit_rows
        n = min(self.unit_rows, self.rows - start)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(u,)))
        if self.quantization is not None:
            out = self._packed_rows(rng, n, self.quantization)
        else:
            out = rng.standard_normal((n, self.dim), dtype=np.float32)
            out *= np.float32(self.src.std)
        self._cached = (u, out)
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        u0, u1 = start // self.unit_rows, (stop - 1) // self.unit_rows
        parts = [self._unit(u) for u in range(u0, u1 + 1)]
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
        off = u0 * self.unit_rows
        kind = "uint8" if self.quantization is not None else "float32"
        return _to_disk(block[start - off : stop - off], kind, self.dtype)

    @staticmethod
    def _packed_rows(rng: np.random.Generator, n: int, quant: RowQuantization) -> np.ndarray:
        """Random finite e4m3 codes (0x7F and 0xFF, the NaNs, skipped) and scale bytes."""
        codes = rng.integers(0, 254, size=(n, quant.values), dtype=np.uint8)
        codes += codes >= 0x7F  # 0..253 -> the 254 finite codes
        lo, hi = RANDOM_SCALE_BYTES
        scales = rng.integers(lo, hi, size=(n, quant.scales), dtype=np.uint8, endpoint=True)
        return pack_rows(codes, scales)


def tensor_without_values(tensor: torch.Tensor) -> str | None:
    """Why ``tensor``'s values cannot be read as a dense array (a meta or a sparse tensor), as
    the end of an error message; None when they can."""
    if tensor.is_meta:
        return (
            "is on the meta device (a shape without data); expected a tensor holding its values "
            "(load or initialise them first)"
        )
    if tensor.is_nested:  # strided or jagged: its rows differ in length, to_dense() fails
        return (
            "is a nested tensor (its entries may differ in shape); expected a dense tensor "
            "(pass tensor.to_padded_tensor(0.0) or torch.stack(tensor.unbind()))"
        )
    if tensor.layout != torch.strided:
        return (
            f"has layout {tensor.layout}; expected a dense (strided) tensor "
            "(pass tensor.to_dense())"
        )
    return None


def describe_tensor(tensor: torch.Tensor) -> str:
    """A tensor's dtype and shape for an error message: ``float32 (2, 8)``; a nested tensor, whose
    entries may differ in shape, by its count of them."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if tensor.is_nested and tensor.layout == torch.strided:  # .shape raises for these
        return f"{dtype} nested ({tensor.size(0)} tensors)"
    return f"{dtype} {tuple(tensor.shape)}"


def check_tensor_holds_rows(tensor: torch.Tensor, desc: str) -> None:
    """Refuse a tensor whose rows cannot be read in slices: a meta one, or a sparse one."""
    problem = tensor_without_values(tensor)
    if problem is not None:
        raise TableFormatError(f"source {desc} {problem}")


def open_source(source: object, dtype: object) -> SourceReader:
    """Wrap any supported source in a reader; validates before anything touches disk."""
    if isinstance(source, SourceReader):  # a reader made by the caller (e.g. compaction)
        return source
    if isinstance(source, RandomSource):
        return _RandomReader(source, dtype)
    if isinstance(source, SafetensorsSource):
        return _SafetensorsReader(source, dtype)
    if isinstance(source, PackedSafetensorsSource):
        return _PackedSafetensorsReader(source, dtype)
    if isinstance(source, torch.Tensor):
        desc = f"torch.Tensor {describe_tensor(source)}"
        check_tensor_holds_rows(source, desc)
        return _ArrayReader(source, "source tensor", dtype, desc)
    if isinstance(source, np.ndarray):
        return _ArrayReader(source, "source array", dtype, f"ndarray {source.dtype} {source.shape}")
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            mode = os.stat(path).st_mode
        except (OSError, ValueError):  # (ValueError: a NUL, a lone surrogate)
            mode = 0  # no file: said not to exist
        if stat.S_ISDIR(mode):
            raise TableFormatError(
                f"source .npy file {path} is a directory; expected a 2-D .npy file"
            )
        if (kind := special_kind(mode)) is not None:  # "does not exist" said of a FIFO
            raise TableFormatError(f"source .npy file {path} is {kind}; expected a 2-D .npy file")
        if not stat.S_ISREG(mode):
            raise TableNotFoundError(
                errno.ENOENT, f"source .npy file {path} does not exist", str(path)
            )
        try:
            arr = load_npy(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise TableFormatError(f"source {path} is not a readable .npy file: {exc}") from None
        if not isinstance(arr, np.ndarray):  # an .npz archive
            members = ", ".join(arr.files)
            arr.close()
            raise TableFormatError(
                f"source {path} is an .npz archive (members: {members or 'none'}); expected a "
                "2-D .npy file (save the table's array with np.save)"
            )
        return _ArrayReader(arr, f"source .npy {path}", dtype, f"npy:{path.resolve()}")
    raise TableFormatError(
        f"source is a {type(source).__name__}; expected np.ndarray, torch.Tensor, a .npy path, "
        "SafetensorsSource, PackedSafetensorsSource or RandomSource"
    )
