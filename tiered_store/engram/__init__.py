"""Engram (DeepSeek 2026, "Conditional Memory via Scalable Lookup"): addressing and module.

Bit-exact with the reference ``engram_demo_v1.py``: tokenizer compression
(``CompressedTokenizer``), N-gram hashing into prime-sized per-head tables (``NgramHasher``), and
the gated Engram layer (``Engram``) over a pluggable table backend (``TableBackend``:
``InMemoryTable`` or the tiered store).
"""

from .backend import InMemoryTable, TableBackend
from .checkpoint import check_table_file, convert_checkpoint, load_tiered_model, open_tables
from .config import (
    BackboneConfig,
    EngramConfig,
    ModelConfig,
    TransformerConfig,
    load_engram_config,
)
from .hashing import NgramHasher, layer_multipliers, table_primes, to_row_ids
from .model import EngramLM
from .module import EMBEDDING_KEY, Engram, MultiHeadEmbedding, ShortConv, split_checkpoint
from .pipeline import PrefetchPipeline
from .tokenizer import CompressedTokenizer, check_token_ids, default_tokenizer_path

__all__ = [
    "EMBEDDING_KEY",
    "EngramLM",
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
