"""Inference request bodies: JSON -> a validated ``[B, T]`` token id array, or a ``RequestError``."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import TieredStoreError
from .config import ServerSection

if TYPE_CHECKING:
    from .stack import EngramStack

__all__ = ["InferenceRequest", "RequestError", "parse_request"]


class RequestError(TieredStoreError, ValueError):
    """A client's request is malformed or over a limit; ``status`` is the HTTP code to answer."""

    def __init__(self, status: int, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow  # the Allow header of a 405


@dataclass
class InferenceRequest:
    """A validated inference request."""

    input_ids: np.ndarray  # int64 [B, T], padded on the right for ragged text
    lengths: list[int]  # tokens per sequence before padding
    from_text: bool
    return_output: bool


_REQUEST_KEYS = ("input_ids", "text", "return_output")
_ID_LIMIT = 1 << 62  # token ids must lie strictly between -_ID_LIMIT and _ID_LIMIT


def parse_request(body: bytes, server: ServerSection, stack: EngramStack) -> InferenceRequest:
    """Validate an inference request body; raise ``RequestError`` (400/413) naming the problem.

    Examples
    --------
    >>> parse_request(b'{"input_ids": [[1, 2, 3]]}', ServerSection(), stack).input_ids.shape  # doctest: +SKIP
    (1, 3)
    >>> parse_request(b'{"input_ids": [1.5]}', ServerSection(), stack)  # doctest: +SKIP
    Traceback (most recent call last):
    tiered_store.serve.inference_request.RequestError: input_ids[0]: got float 1.5; expected an integer token id
    """
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, f"body: not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError(400, "body: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise RequestError(
            400,
            f'body: got a JSON {_json_type(doc)}; expected an object like {{"input_ids": [[1, 2, 3]]}}',
        )
    unknown = sorted(k for k in doc if k not in _REQUEST_KEYS)
    if unknown:
        raise RequestError(
            400, f"{unknown[0]}: unknown key; expected one of {', '.join(_REQUEST_KEYS)}"
        )
    return_output = doc.get("return_output", False)
    if not isinstance(return_output, bool):
        raise RequestError(
            400, f"return_output: got {_json_type(return_output)}; expected true or false"
        )
    if ("input_ids" in doc) == ("text" in doc):
        raise RequestError(400, "body: expected exactly one of 'input_ids' and 'text'")
    if "text" in doc:
        rows = _tokenize(doc["text"], stack)
        from_text = True
    else:
        rows = _id_rows(doc["input_ids"])
        from_text = False
    lengths = [len(r) for r in rows]
    _check_limits(lengths, server, "text" if from_text else "input_ids")
    if not from_text and len(set(lengths)) > 1:
        raise RequestError(
            400,
            f"input_ids: rows have different lengths {sorted(set(lengths))}; expected a rectangle "
            "[B, T] (send text, or pad the rows yourself)",
        )
    width = max(lengths)
    ids = np.full((len(rows), width), stack.pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    if not from_text:
        bad = (ids < 0) | (ids >= stack.vocab_size)
        if bad.any():
            b, t = (int(x) for x in np.argwhere(bad)[0])
            raise RequestError(
                400,
                f"input_ids[{b}][{t}]: token id {int(ids[b, t])} is outside the tokenizer vocabulary; "
                f"expected 0 <= id < {stack.vocab_size}",
            )
    if return_output:
        values = ids.size * stack.config.backbone.hc_mult * stack.config.backbone.hidden_size
        if values > server.max_output_values:
            raise RequestError(
                413,
                f"return_output: the output has {values:,} values; this server returns at most "
                f"{server.max_output_values:,} (server.max_output_values)",
            )
    return InferenceRequest(ids, lengths, from_text, return_output)


def _id_rows(value: Any) -> list[list[int]]:
    """``input_ids`` as a list of rows of ints (type-checked, range-checked later)."""
    if not isinstance(value, list) or not value:
        raise RequestError(
            400,
            f"input_ids: got {_json_type(value)}; expected a non-empty list of token ids or of rows",
        )
    rows = value if isinstance(value[0], list) else [value]
    if not _are_token_ids(rows):
        _raise_first_bad_id(rows, nested=rows is value)
    return rows


def _are_token_ids(rows: list[Any]) -> bool:
    """Whether every row is a list of ints inside the id limit (checked without a loop per token)."""
    if not all(isinstance(row, list) for row in rows):
        return False
    tokens = list(itertools.chain.from_iterable(rows))
    if not set(map(type, tokens)) <= {int}:  # bool is a subclass of int: rejected too
        return False
    try:
        ids = np.array(tokens, dtype=np.int64)
    except OverflowError:
        return False
    return not ((ids <= -_ID_LIMIT) | (ids >= _ID_LIMIT)).any()


def _raise_first_bad_id(rows: list[Any], *, nested: bool) -> None:
    """Raise the ``RequestError`` naming the first row or token id that is not a valid id."""
    for b, row in enumerate(rows):
        where = f"input_ids[{b}]" if nested else "input_ids"
        if not isinstance(row, list):
            raise RequestError(400, f"{where}: got {_json_type(row)}; expected a list of token ids")
        for t, x in enumerate(row):
            if type(x) is not int:  # bool is a subclass of int: rejected too
                raise RequestError(
                    400,
                    f"{where}[{t}]: got {_json_type(x)} {json.dumps(x)[:40]}; expected an "
                    "integer token id",
                )
            if not -_ID_LIMIT < x < _ID_LIMIT:
                raise RequestError(400, f"{where}[{t}]: token id {x:.3g} is out of range")


def _tokenize(value: Any, stack: EngramStack) -> list[list[int]]:
    """``text`` (a string or a list of strings) -> token id rows."""
    texts = value if isinstance(value, list) else [value]
    if not texts:
        raise RequestError(400, "text: got an empty list; expected a string or a list of strings")
    rows = []
    for i, text in enumerate(texts):
        where = f"text[{i}]" if isinstance(value, list) else "text"
        if not isinstance(text, str):
            raise RequestError(400, f"{where}: got {_json_type(text)}; expected a string")
        ids = stack.hasher.tokenizer.encode(text).tolist()
        if not ids:
            raise RequestError(400, f"{where}: tokenises to no tokens; expected some text")
        rows.append(ids)
    return rows


def _check_limits(lengths: list[int], server: ServerSection, key: str) -> None:
    """Batch size, sequence length and total tokens against the server's limits (413)."""
    if len(lengths) > server.max_batch:
        raise RequestError(
            413,
            f"{key}: {len(lengths)} sequences; this server takes at most {server.max_batch} (server.max_batch)",
        )
    if min(lengths) == 0:
        raise RequestError(
            400, f"{key}[{lengths.index(0)}]: empty sequence; expected at least one token"
        )
    if max(lengths) > server.max_seq_len:
        raise RequestError(
            413,
            f"{key}: a sequence of {max(lengths)} tokens; this server takes at most "
            f"{server.max_seq_len} per sequence (server.max_seq_len)",
        )
    total = len(lengths) * max(lengths)
    if total > server.max_tokens:
        raise RequestError(
            413,
            f"{key}: {total:,} tokens (batch x longest sequence); this server takes at most "
            f"{server.max_tokens:,} per request (server.max_tokens)",
        )


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "float", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )
