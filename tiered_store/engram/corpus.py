"""Real text for the Engram model: files -> DeepSeek token ids -> ``[B, T]`` batches.

The default corpus is the Python standard library's own source files
(``sysconfig.get_paths()["stdlib"]``, ``site-packages`` left out): it is on every machine that
runs this library, nothing is downloaded, and it is real, Zipfian text (about 1,800 files and
9 M tokens for CPython 3.11).
"""

from __future__ import annotations

import glob
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .tokenizer import CompressedTokenizer

__all__ = ["corpus_files", "default_corpus_root", "read_tokens", "token_batches"]

EOS_TOKEN = "<｜end▁of▁sentence｜>"  # separates documents in the token stream
_ENCODE_CHUNK_FILES = 64  # files tokenised per encode_batch call (parallel in the Rust tokenizer)


def default_corpus_root() -> Path:
    """The Python standard library's source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(sources: Sequence[str | Path] | None = None) -> list[Path]:
    """The files of a corpus, sorted and de-duplicated.

    Parameters
    ----------
    sources
        Files, directories (every ``*.py`` below them) or glob patterns (``**`` allowed).
        Default: the standard library's ``*.py`` files, without ``site-packages``.

    Raises
    ------
    ConfigError
        Nothing matches; the message names the sources.

    Examples
    --------
    >>> files = corpus_files()
    >>> len(files) > 100, files[0].suffix
    (True, '.py')
    """
    if not sources:
        root = default_corpus_root()
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    else:
        files = []
        for source in sources:
            path = Path(source).expanduser()
            if path.is_dir():
                files.extend(path.rglob("*.py"))
            elif path.is_file():
                files.append(path)
            else:
                files.extend(Path(p) for p in glob.glob(str(path), recursive=True))
    files = sorted({p.resolve() for p in files if p.is_file()})
    if not files:
        shown = [str(s) for s in sources] if sources else [str(default_corpus_root())]
        raise ConfigError(
            f"corpus: no files found for {shown}; expected files, directories (*.py below them) "
            "or glob patterns"
        )
    return files


def read_tokens(
    files: Sequence[Path],
    tokenizer: CompressedTokenizer,
    *,
    max_tokens: int,
    shuffle_seed: int | None = 0,
) -> np.ndarray:
    """Token ids of the files, documents separated by the end-of-sentence token, at most
    ``max_tokens`` (int64 [N]).

    Files are read in a seeded random order (``shuffle_seed=None``: sorted order), so a capped
    read samples the whole corpus rather than its first directory. Unreadable files are skipped;
    undecodable bytes are replaced.
    """
    if max_tokens < 1:
        raise ConfigError(f"max_tokens: expected an integer >= 1, got {max_tokens!r}")
    order = list(files)
    if shuffle_seed is not None:
        order = [order[i] for i in np.random.default_rng(shuffle_seed).permutation(len(order))]
    eos = tokenizer.tokenizer.token_to_id(EOS_TOKEN)
    parts: list[np.ndarray] = []
    total = 0
    for start in range(0, len(order), _ENCODE_CHUNK_FILES):
        texts = []
        for path in order[start : start + _ENCODE_CHUNK_FILES]:
            try:
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
        for encoding in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = encoding.ids + ([eos] if eos is not None else [])
            parts.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
        if total >= max_tokens:
            break
    if not parts:
        raise ConfigError(f"corpus: none of the {len(order)} files could be read")
    return np.concatenate(parts)[:max_tokens]


def token_batches(tokens: np.ndarray, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """Cut a token stream into ``[batch_size, seq_len]`` batches (the remainder is dropped).

    Examples
    --------
    >>> [tuple(b.shape) for b in token_batches(np.arange(100), 2, 16)]
    [(2, 16), (2, 16), (2, 16)]
    """
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(
            f"batch: expected batch_size >= 1 and seq_len >= 1, got {batch_size} x {seq_len}"
        )
    per_batch = batch_size * seq_len
    count = len(tokens) // per_batch
    if count == 0:
        raise ConfigError(
            f"corpus: {len(tokens):,} tokens do not fill one batch of {batch_size} x {seq_len}; "
            "expected a larger corpus or smaller batches"
        )
    data = torch.from_numpy(np.ascontiguousarray(tokens[: count * per_batch], dtype=np.int64))
    return list(data.view(count, batch_size, seq_len).unbind(0))


def iter_batches(batches: Sequence[torch.Tensor], rounds: int) -> Iterator[list[torch.Tensor]]:
    """Split ``batches`` into ``rounds`` consecutive groups of (nearly) equal size."""
    bounds = np.linspace(0, len(batches), rounds + 1).round().astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi > lo:
            yield list(batches[lo:hi])
