"""What the server accepts: its settings (`ServeSettings`: batching and request limits) and the reading and
validation of one ``POST /predict`` request, refused as a `RequestError` naming the offending field."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from starlette.requests import Request

from frugalnlp.errors import FrugalError

BATCHING = ("segment", "request")


@dataclass
class ServeSettings:
    """Batching and request limits of `create_app`."""

    max_batch: int = 64  # texts per micro-batch (and per segment run)
    max_wait_ms: float = 5.0  # how long the oldest waiting text may wait for a batch to fill
    length_bucket: int = 16  # a run's rows go through the model sorted by length, this many at a time
    max_tokens: int | None = None  # instead: as many sorted rows at a time as fit in this many padded tokens
    batching: str = "segment"  # or "request"
    max_texts: int = 256  # per request
    max_chars: int = 20_000  # per text
    max_queue: int = 8192  # texts waiting before new requests get 503
    max_body_bytes: int = 16 * 2**20  # per request body, checked on Content-Length before reading
    body_timeout_s: float = 10.0  # a request body must have arrived in full by then (else 408)
    idle_timeout_s: float = 5.0  # a connection without a request's complete headers for this long is closed
    max_connections: int = 512  # open connections (and requests) at once; past it, requests get 503

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise FrugalError(f"unknown --batching '{self.batching}'; choose one of {', '.join(BATCHING)}")
        for name in ("max_batch", "length_bucket", "max_texts", "max_chars", "max_queue", "max_body_bytes",
                     "max_connections"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise FrugalError(f"--{name.replace('_', '-')} {getattr(self, name)!r} must be a whole number >= 1")
        if self.max_tokens is not None and not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise FrugalError(f"--max-tokens {self.max_tokens!r} must be a whole number >= 1")
        if not 0 <= self.max_wait_ms < float("inf"):
            raise FrugalError(f"--max-wait-ms {self.max_wait_ms!r} must be a finite number >= 0")
        for name in ("body_timeout_s", "idle_timeout_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise FrugalError(f"--{name[:-2].replace('_', '-')} {getattr(self, name)!r} must be a positive "
                                  "number of seconds")


class RequestError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message, "field": field}``.

    ``close``: the connection is closed after the answer (its body was not read to the end).
    """

    def __init__(self, status: int, field: str | None, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.close = status, field, message, close


CLIENT_CLOSED = 499  # the client went away before its request was read: counted apart from server errors


async def read_body(request: Request, settings: ServeSettings) -> bytes:
    """The request's body, refused (413) past ``max_body_bytes`` before it is read when ``Content-Length``
    says so, and while it streams otherwise; 408 when it has not arrived within ``body_timeout_s``.

    Raises `RequestError`, or starlette's ClientDisconnect when the client goes away mid-body.
    """
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "body", f"Content-Length {declared[:20]!r} is not a number of bytes", close=True)
        if int(declared) > limit:
            raise RequestError(413, "body", f"the body has {int(declared)} bytes; at most {limit} per request",
                               close=True)
    body = bytearray()
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RequestError(413, "body", f"the body is over {limit} bytes; at most {limit} per request",
                                       close=True)
    except TimeoutError:
        raise RequestError(408, "body", f"the body did not arrive within {settings.body_timeout_s:g} s",
                           close=True) from None
    return bytes(body)


def parse_request(body: bytes, is_pair: bool, settings: ServeSettings) -> tuple[list[str], list[str] | None]:
    """Validate a /predict body: ``{"texts": [...]}`` (and ``"text_pairs"`` for pair models).

    Raises `RequestError` naming the offending field.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError(400, "body", "the body is not valid JSON (UTF-8)") from None
    if not isinstance(payload, dict):
        raise RequestError(422, "body", 'the body must be a JSON object such as {"texts": ["..."]}')
    allowed = {"texts", "text_pairs"}
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise RequestError(422, unknown[0], f"unknown field '{unknown[0]}'; send {{\"texts\": [...]}}"
                           + (' and "text_pairs"' if is_pair else ""))
    texts = _text_list(payload, "texts", settings)
    pairs = None
    if is_pair:
        if "text_pairs" not in payload:
            raise RequestError(422, "text_pairs", "this model classifies text pairs: send text_pairs beside texts")
        pairs = _text_list(payload, "text_pairs", settings)
        if len(pairs) != len(texts):
            raise RequestError(422, "text_pairs", f"text_pairs has {len(pairs)} items but texts has {len(texts)}")
    elif "text_pairs" in payload:
        raise RequestError(422, "text_pairs", "this model classifies single texts: leave out text_pairs")
    return texts, pairs


def _text_list(payload: dict, name: str, settings: ServeSettings) -> list[str]:
    if name not in payload:
        raise RequestError(422, name, f"missing field '{name}': a list of strings")
    texts = payload[name]
    if not isinstance(texts, list):
        raise RequestError(422, name, f"'{name}' must be a list of strings, not {type(texts).__name__}")
    if not texts:
        raise RequestError(422, name, f"'{name}' is empty")
    if len(texts) > settings.max_texts:
        raise RequestError(413, name, f"'{name}' has {len(texts)} items; at most {settings.max_texts} per request")
    for i, text in enumerate(texts):
        where = f"{name}[{i}]"
        if not isinstance(text, str):
            raise RequestError(422, where, f"'{where}' must be a string, not {type(text).__name__}")
        if not text.strip():
            raise RequestError(422, where, f"'{where}' is empty")
        if len(text) > settings.max_chars:
            raise RequestError(413, where, f"'{where}' has {len(text)} characters; at most {settings.max_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(422, where, f"'{where}' is not valid Unicode (a lone surrogate)") from None
    return texts
