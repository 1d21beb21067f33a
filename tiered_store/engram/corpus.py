"""Real text for the Engram model: a corpus -> DeepSeek token ids -> ``[B, T]`` batches.

Which files make a corpus, and how they are read (UTF-8; binary, undecodable and empty files
skipped), is ``tiered_store.corpus``'s job, shared with ``tiered-store analyze``; by default it is
the Python standard library's own ``*.py`` sources, which every machine has.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..corpus import Corpus, CorpusError, ReadStats, SkippedFilesWarning, iter_texts
from ..errors import ConfigError, warn_at_caller
from ..id_ops import array_for_torch
from ..integers import as_integer
from .tokenizer import _CHARS_PER_TOKEN, CompressedTokenizer, encode_texts

__all__ = ["iter_batches", "read_tokens", "token_batches"]

EOS_TOKEN = "<｜end▁of▁sentence｜>"  # separates documents in the token stream
_ENCODE_CHUNK_FILES = 64  # documents tokenised per encode_batch call (parallel in Rust)


def read_tokens(corpus: Corpus, tokenizer: CompressedTokenizer, *, max_tokens: int) -> np.ndarray:
    """Token ids of the corpus's documents in its order, each followed by the end-of-sentence
    token, at most ``max_tokens`` (int64 [N]); reading stops once enough are read. Files skipped
    on the way (binary, not UTF-8, empty, unreadable) are named in a ``SkippedFilesWarning``; a
    tokenizer without that token gets a ``UserWarning`` (documents then follow each other unsplit).

    Examples
    --------
    >>> from tiered_store.corpus import resolve_corpus
    >>> tokens = read_tokens(resolve_corpus().shuffled(0), CompressedTokenizer(), max_tokens=5000)
    >>> tokens.shape, tokens.dtype
    ((5000,), dtype('int64'))
    """
    count = as_integer(max_tokens)  # a NumPy integer too (a sum of sizes); not a bool
    if count is None or count < 1:
        raise ConfigError(f"max_tokens: got {max_tokens!r}; expected an integer >= 1")
    max_tokens = count
    eos = tokenizer.tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        warn_at_caller(
            f"tokenizer {str(tokenizer.tokenizer_path)!r} has no end-of-sentence token "
            f"{EOS_TOKEN!r}: the corpus's documents follow each other without a separator",
            UserWarning,
        )
    parts: list[np.ndarray] = []
    total = 0
    texts: list[str] = []
    stats = ReadStats()

    def encode() -> None:
        nonlocal total
        left = [max_tokens - total] * len(texts)  # a long document is tokenised only so far
        for ids in encode_texts(tokenizer.tokenizer, texts, left):
            if eos is not None:
                ids = np.append(ids, eos)
            parts.append(ids)
            total += len(ids)
        texts.clear()

    size = 0  # characters in texts
    for _, text in iter_texts(corpus.files, stats):
        texts.append(text)
        size += len(text)
        # tokenised once there are enough files, or text for the tokens still wanted (at up to
        # _CHARS_PER_TOKEN a token): a small cap does not read 64 files first
        if len(texts) == _ENCODE_CHUNK_FILES or size >= _CHARS_PER_TOKEN * (max_tokens - total):
            encode()
            size = 0
            if total >= max_tokens:
                break
    encode()
    if warning := stats.warning():
        warn_at_caller(warning, SkippedFilesWarning)
    if not parts:
        raise CorpusError(f"corpus {corpus.description}: no readable text in {len(corpus)} files")
    return np.concatenate(parts)[:max_tokens]


def token_batches(tokens: np.ndarray, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """Cut a token stream into ``[batch_size, seq_len]`` batches (the remainder is dropped).

    Examples
    --------
    >>> [tuple(b.shape) for b in token_batches(np.arange(100), 2, 16)]
    [(2, 16), (2, 16), (2, 16)]
    """
    sizes = [as_integer(n) for n in (batch_size, seq_len)]
    if any(n is None or n < 1 for n in sizes):
        raise ConfigError(
            f"batch: expected integers batch_size >= 1 and seq_len >= 1, got {batch_size!r} x "
            f"{seq_len!r}"
        )
    batch_size, seq_len = sizes
    per_batch = batch_size * seq_len
    count = len(tokens) // per_batch
    if count == 0:
        raise ConfigError(
            f"corpus: {len(tokens):,} tokens do not fill one batch of {batch_size} x {seq_len}; "
            "expected a larger corpus or smaller batches"
        )
    # a read-only memmap of tokens is copied: torch has no read-only tensors (it warns)
    data = torch.from_numpy(
        array_for_torch(np.asarray(tokens[: count * per_batch], dtype=np.int64))
    )
    return list(data.view(count, batch_size, seq_len).unbind(0))


def iter_batches(batches: Sequence[torch.Tensor], rounds: int) -> Iterator[list[torch.Tensor]]:
    """Split ``batches`` into ``rounds`` consecutive groups of (nearly) equal size (fewer when
    there are fewer batches than rounds: no group is empty)."""
    count = as_integer(rounds)  # a NumPy or torch integer too; not a bool
    if count is None or count < 1:
        raise ConfigError(f"rounds: expected an integer >= 1, got {rounds!r}")
    bounds = np.linspace(0, len(batches), count + 1).round().astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi > lo:
            yield list(batches[lo:hi])
