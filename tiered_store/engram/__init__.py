"""Engram (DeepSeek 2026, "Conditional Memory via Scalable Lookup"): addressing and module.

Bit-exact with the reference ``engram_demo_v1.py``: tokenizer compression
(``CompressedTokenizer``), N-gram hashing into prime-sized per-head tables (``NgramHasher``), and
the gated Engram layer (``Engram``) over a pluggable table backend (``TableBackend``:
``InMemoryTable`` or the tiered store). DeepSeek-V4.1's geometry: ``V41Engram`` over packed fp8
tables (``PackedInMemoryTable`` or the tiered store), dead tokens and ``HashState`` for decoding;
``EngramLM`` builds either kind from its config.
"""

from .backend import InMemoryTable, PackedInMemoryTable, TableBackend
from .checkpoint import check_table_file, convert_checkpoint, load_tiered_model, open_tables
from .config import (
    BackboneConfig,
    EngramConfig,
    ModelConfig,
    TransformerConfig,
    load_engram_config,
)
from .hashing import HashState, NgramHasher, layer_multipliers, table_primes, to_row_ids
from .model import EngramBatch, EngramLM, KVCache
from .module import EMBEDDING_KEY, Engram, MultiHeadEmbedding, ShortConv, split_checkpoint
from .pipeline import DecodeStats, PrefetchPipeline
from .tokenizer import CompressedTokenizer, check_token_ids, default_tokenizer_path
from .v41_module import V41Engram

__all__ = [
    "EMBEDDING_KEY",
    "DecodeStats",
    "EngramBatch",
    "EngramLM",
    "HashState",
    "KVCache",
    "PackedInMemoryTable",
    "V41Engram",
    "ModelConfig",
    "PrefetchPipeline",
    "TransformerConfig",
    "check_table_file",
    "convert_checkpoint",
    "load_tiered_model",
    "open_tables",
    "BackboneConfig",
    "CompressedTokenizer",
    "Engram",
    "EngramConfig",
    "InMemoryTable",
    "MultiHeadEmbedding",
    "NgramHasher",
    "ShortConv",
    "TableBackend",
    "check_token_ids",
    "default_tokenizer_path",
    "layer_multipliers",
    "load_engram_config",
    "split_checkpoint",
    "table_primes",
    "to_row_ids",
]
