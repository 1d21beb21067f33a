"""Inference request bodies: JSON -> a validated ``[B, T]`` token id array, or a ``RequestError``.

Cheap checks come first: the body's size was bounded by the transport; here the batch size, each
text's length in characters and each id row's length are checked before any text is tokenised or
any id converted, so an oversize request costs a JSON parse, never a tokenisation.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..config import repeated_key
from ..errors import TieredStoreError, cut_text
from .config import ServerSection

__all__ = ["ClientGone", "InferenceRequest", "RequestError", "parse_request"]


class ClientGone(Exception):  # noqa: N818 (not an error of the server's or the client's)
    """The client closed its connection, or ended its stream, while its request waited for a
    compute turn: not computed (``server.drop_abandoned``)."""


class RequestError(TieredStoreError, ValueError):
    """A client's request is malformed or over a limit; ``status`` is the HTTP code to answer."""

    def __init__(self, status: int, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow  # the Allow header of a 405


class RequestModel(Protocol):
    """What parsing needs from the served model."""

    vocab_size: int  # token ids must lie in [0, vocab_size)
    pad_id: int  # pads ragged text rows on the right

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ...


@dataclass
class InferenceRequest:
    """A validated inference request."""

    input_ids: np.ndarray  # int64 [B, T], padded on the right for ragged text
    lengths: list[int]  # tokens per sequence before padding
    from_text: bool
    top_k: int  # next-token candidates returned per sequence


_REQUEST_KEYS = ("input_ids", "text", "top_k")
MAX_TOP_K = 20  # next-token candidates a request may ask for
_ID_LIMIT = 1 << 62  # token ids must lie strictly between -_ID_LIMIT and _ID_LIMIT


def parse_request(body: bytes, server: ServerSection, model: RequestModel) -> InferenceRequest:
    """Validate an inference request body; raise ``RequestError`` (400/413) naming the problem.

    Parameters
    ----------
    body
        The raw request body (JSON).
    server
        The limits (``max_batch``, ``max_seq_len``, ``max_tokens``, ``max_text_chars``).
    model
        The served model: vocabulary size, pad id and tokenizer.

    Examples
    --------
    >>> parse_request(b'{"input_ids": [[1, 2, 3]]}', ServerSection(), model).input_ids.shape  # doctest: +SKIP
    (1, 3)
    >>> parse_request(b'{"input_ids": [1.5]}', ServerSection(), model)  # doctest: +SKIP
    Traceback (most recent call last):
    tiered_store.serve.inference_request.RequestError: input_ids[0]: got float 1.5; expected an integer token id
    """
    if not body.strip():
        raise RequestError(
            400, 'body: empty; expected a JSON object like {"input_ids": [[1, 2, 3]]}'
        )
    try:
        doc = json.loads(body, object_pairs_hook=_object_of_distinct_keys)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(400, "body: JSON nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"body: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise RequestError(400, f"body: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RequestError(
            400,
            f'body: got a JSON {_json_type(doc)}; expected an object like {{"input_ids": [[1, 2, 3]]}}',
        )
    unknown = sorted(k for k in doc if k not in _REQUEST_KEYS)
    if unknown:
        raise RequestError(
            400,
            f"{cut_text(unknown[0], 40)}: unknown key; expected one of {', '.join(_REQUEST_KEYS)}",
        )
    top_k = doc.get("top_k", 1)
    if type(top_k) is not int or not 1 <= top_k <= MAX_TOP_K:
        raise RequestError(
            400,
            f"top_k: got {_described(top_k)}; expected an integer from 1 to {MAX_TOP_K}",
        )
    if ("input_ids" in doc) == ("text" in doc):
        raise RequestError(400, "body: expected exactly one of 'input_ids' and 'text'")
    if "text" in doc:
        rows = _tokenize(doc["text"], server, model)
        from_text = True
    else:
        rows = _id_rows(doc["input_ids"], server)
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
    ids = np.full((len(rows), width), model.pad_id, dtype=np.int64)
    for i, row in enumerate(rows):  # one copy per sequence (at most server.max_batch)
        ids[i, : len(row)] = row
    if not from_text:
        bad = (ids < 0) | (ids >= model.vocab_size)
        if bad.any():
            b, t = (int(x) for x in np.argwhere(bad)[0])
            where = (
                f"input_ids[{b}][{t}]"
                if isinstance(doc["input_ids"][0], list)
                else f"input_ids[{t}]"
            )
            raise RequestError(
                400,
                f"{where}: token id {int(ids[b, t])} is outside the vocabulary; expected "
                f"0 <= id < {model.vocab_size}",
            )
    return InferenceRequest(ids, lengths, from_text, top_k)


def _object_of_distinct_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice is refused (json.loads keeps the last)."""
    if (key := repeated_key(pairs)) is not None:
        raise RequestError(
            400, f"body: key {json.dumps(key)[:40]} appears twice; expected each key once"
        )
    return dict(pairs)


def _id_rows(value: Any, server: ServerSection) -> list[list[int]]:
    """``input_ids`` as a list of rows of ints; sizes are checked before the ids are."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else _json_type(value)
        raise RequestError(
            400, f"input_ids: got {got}; expected a non-empty list of token ids or of rows"
        )
    rows = value if isinstance(value[0], list) else [value]
    if all(isinstance(row, list) for row in rows):
        _check_limits([len(row) for row in rows], server, "input_ids")
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
                    f"{where}[{t}]: got {_described(x)}; expected an integer token id",
                )
            if not -_ID_LIMIT < x < _ID_LIMIT:  # its digits: past ~1.8e308 an int is no float
                digits = str(x)
                if len(digits) > 24:
                    digits = f"{digits[:20]}... ({len(digits.lstrip('-'))} digits)"
                raise RequestError(400, f"{where}[{t}]: token id {digits} is out of range")


def _tokenize(value: Any, server: ServerSection, model: RequestModel) -> list[list[int]]:
    """``text`` (a string or a list of strings) -> token id rows; limits first, then tokenise."""
    texts = value if isinstance(value, list) else [value]
    if not texts:
        raise RequestError(400, "text: got an empty list; expected a string or a list of strings")
    if len(texts) > server.max_batch:
        raise RequestError(
            413,
            f"text: {len(texts)} sequences; this server takes at most {server.max_batch} "
            "(server.max_batch)",
        )
    for i, text in enumerate(texts):  # every text checked before any is tokenised
        where = f"text[{i}]" if isinstance(value, list) else "text"
        if not isinstance(text, str):
            raise RequestError(400, f"{where}: got {_json_type(text)}; expected a string")
        if len(text) > server.max_text_chars:
            raise RequestError(
                413,
                f"{where}: {len(text):,} characters; this server tokenises at most "
                f"{server.max_text_chars:,} per text (server.max_text_chars)",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(
                400,
                f"{where}: a lone surrogate {text[exc.start]!r} at character {exc.start}; "
                "expected valid Unicode text",
            ) from None
    rows = []
    for i, text in enumerate(texts):
        ids = model.tokenize(text)
        if not ids:
            where = f"text[{i}]" if isinstance(value, list) else "text"
            raise RequestError(400, f"{where}: tokenises to no tokens; expected some text")
        rows.append(ids)
    return rows


def _check_limits(lengths: list[int], server: ServerSection, key: str) -> None:
    """Batch size, sequence length and total tokens against the server's limits (413)."""
    if len(lengths) > server.max_batch:
        raise RequestError(
            413,
            f"{key}: {len(lengths):,} sequences; this server takes at most {server.max_batch:,} "
            "(server.max_batch)",
        )
    if min(lengths) == 0:
        raise RequestError(
            400, f"{key}[{lengths.index(0)}]: empty sequence; expected at least one token"
        )
    if max(lengths) > server.max_seq_len:
        raise RequestError(
            413,
            f"{key}: a sequence of {max(lengths):,} tokens; this server takes at most "
            f"{server.max_seq_len:,} per sequence (server.max_seq_len)",
        )
    total = len(lengths) * max(lengths)
    if total > server.max_tokens:
        raise RequestError(
            413,
            f"{key}: {total:,} tokens (batch x longest sequence); this server takes at most "
            f"{server.max_tokens:,} per request (server.max_tokens)",
        )


def _described(value: Any) -> str:
    """A parsed value as a message shows it: its JSON type and (unless null) the value, cut short.

    >>> _described(None), _described(2.5), _described("x" * 50)
    ('null', 'float 2.5', 'string "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx')
    """
    kind = _json_type(value)
    return kind if value is None else f"{kind} {json.dumps(value)[:40]}"


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "float", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )
