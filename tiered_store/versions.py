"""Installed package versions, recorded as provenance in manifests, traces and reports."""

from __future__ import annotations

import importlib.metadata

__all__ = ["package_version"]


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed.

    Examples
    --------
    >>> package_version("numpy") is not None, package_version("no-such-distribution")
    (True, None)
    """
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
