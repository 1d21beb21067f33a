"""tiered-store: a tiered (GPU / host RAM / NVMe) memory store for Engram N-gram embedding tables.

Examples
--------
>>> from tiered_store import TieredStore
>>> store = TieredStore.open("tiers.yaml")            # doctest: +SKIP
>>> rows = store.lookup(ids)                           # doctest: +SKIP
"""

import lazy_loader

# Exports load on first use (the stub beside this file lists them), so that the command
# line's --help and light tools need not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)

__version__ = "0.1.0"
