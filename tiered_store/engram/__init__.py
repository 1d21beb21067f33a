"""Engram (DeepSeek 2026, "Conditional Memory via Scalable Lookup"): addressing and module.

Bit-exact with the reference ``engram_demo_v1.py``: tokenizer compression
(``CompressedTokenizer``), N-gram hashing into prime-sized per-head tables (``NgramHasher``), and
the gated Engram layer (``Engram``) over a pluggable table backend (``TableBackend``:
``InMemoryTable`` or the tiered store). DeepSeek-V4.1's geometry: ``V41Engram`` over packed fp8
tables (``PackedInMemoryTable`` or the tiered store), dead tokens and ``HashState`` for decoding;
``EngramLM`` builds either kind from its config.
"""

import lazy_loader

# Exports load on first use (the stub beside this file lists them), so that the command
# line's --help and light tools need not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
