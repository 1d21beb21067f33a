"""A table manifest's own checksum: a CRC32C over the rest of the manifest, stored in it.

The manifest's ``manifest_crc32c`` is the CRC32C (the ``crc32c`` package, as the page checksums)
of its canonical form: every other field, as parsed, written back as compact JSON with sorted keys
and ASCII escapes (``json.dumps(doc, sort_keys=True, separators=(",", ":"))``), UTF-8 encoded. The
canonical form is of the parsed document, not of its bytes, so indentation and key order are free
and any JSON writer's manifest can be sealed; whitespace aside, damage to any byte either breaks
the JSON or changes the parsed document, and so its CRC32C (an undetected change: about 2**-32).

Manifests written before the field have none and still open (readers before it ignore it, as
they ignore every field they do not know); they hold only the fields listed in ``LEGACY_FIELDS``,
so one of them with another field is a field name damaged (``"metadata"`` one bit off is unknown,
and its Engram layout would silently be dropped) and is refused too.
"""

from __future__ import annotations

import json
from typing import Any

import crc32c

from .errors import TableFormatError

__all__ = ["FIELD", "check_manifest_checksum", "manifest_crc32c", "sealed"]

FIELD = "manifest_crc32c"
# every field a manifest without a checksum can hold (all that versions before it wrote)
LEGACY_FIELDS = {
    "": frozenset(
        [
            "format",
            "format_version",
            "shape",
            "dtype",
            "npy_descr",
            "row_bytes",
            "data_offset",
            "data_bytes",
            "file_bytes",
            "block_bytes",
            "checksum",
            "block_checksums",
            "created",
            "metadata",
            "quantization",
            "page_checksums",
        ]
    ),
    "created": frozenset({"source", "time", "library_version"}),
}


def manifest_crc32c(doc: dict[str, Any]) -> int:
    """CRC32C of the canonical form of a parsed manifest ``doc`` without its ``FIELD``.

    >>> manifest_crc32c({"b": [1, 2.5], "a": "x"}) == manifest_crc32c({"a": "x", "b": [1, 2.5]})
    True
    """
    rest = {key: value for key, value in doc.items() if key != FIELD}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return crc32c.crc32c(canonical.encode("utf-8"))


def sealed(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its ``FIELD`` set, computed over ``doc`` as a reader parses it (a JSON round
    trip: tuples become lists, int keys strings, as on disk).

    >>> d = sealed({"format": "t"}); check_manifest_checksum(d, "m") == d[FIELD]
    True
    """
    parsed = json.loads(json.dumps({key: value for key, value in doc.items() if key != FIELD}))
    return {**doc, FIELD: manifest_crc32c(parsed)}


def check_manifest_checksum(doc: dict[str, Any], where: str) -> int | None:
    """The checksum a parsed manifest records, checked against its content; None for a manifest
    written before manifest checksums. A TableFormatError naming ``where`` (the file) when it is
    corrupt: the checksum differs, or a manifest without one has a field no version wrote."""
    fix = "restore the table's files from a copy, or create the table again"
    if FIELD not in doc:
        for section, known in LEGACY_FIELDS.items():
            fields = doc.get(section) if section else doc
            unknown = sorted(set(fields) - known) if isinstance(fields, dict) else []
            if unknown:
                name = f"{section}.{unknown[0]}" if section else unknown[0]
                raise TableFormatError(
                    f"{where} is corrupt: it has no {FIELD} and a field {name!r} that no "
                    f"tiered-store manifest holds (a damaged field name?); expected the fields "
                    f"{', '.join(sorted(known))}; {fix}"
                )
        return None
    stored = doc[FIELD]
    if not isinstance(stored, int) or isinstance(stored, bool) or not 0 <= stored < 2**32:
        raise TableFormatError(
            f"{where} is corrupt: field {FIELD!r} is {stored!r}; expected a uint32 (the CRC32C "
            f"of the rest of the manifest); {fix}"
        )
    actual = manifest_crc32c(doc)
    if actual != stored:
        raise TableFormatError(
            f"{where} is corrupt: it fails its own checksum: {FIELD} 0x{stored:08x}, actual "
            f"crc32c 0x{actual:08x} of the rest of it (damaged or edited); {fix}"
        )
    return stored
