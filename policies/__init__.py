"""Eviction policies and admission filters for the store's cache tiers, composed by name."""

import lazy_loader

# Exports load on first use (the stub beside this file lists them), so that the command
# line's --help and light tools need not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
