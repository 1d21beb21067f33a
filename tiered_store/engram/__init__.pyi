"""Type stub of the package's lazy exports: what ``__init__.py`` imports on first use."""

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
