"""The client's exceptions, chosen by gRPC status code (never by message text).

Their ``details`` name the fields of the request the caller made, whichever call the client chose
for it: the header fields a chunked call's errors name are given their unary request's names
(:func:`unary_field`), and the helpers whose arguments the request's fields carry under other names
(``perplexity``'s ``logits`` and ``tokens`` as ``input`` and ``target``) give them the caller's
(:func:`caller_fields`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import grpc

_BY_CODE: dict[grpc.StatusCode, type[LossdError]] = {}


class LossdError(Exception):
    """Base class; ``code`` is the gRPC status code, ``details`` the server's message.

    A subclass declared with ``code=`` is the exception for that status code.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init_subclass__(cls, code: grpc.StatusCode | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
            _BY_CODE[code] = cls

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code


class InvalidArgumentError(LossdError, ValueError, code=grpc.StatusCode.INVALID_ARGUMENT):
    """The request was rejected as torch would reject it (INVALID_ARGUMENT); also a ``ValueError``.

    ``details`` names the field, what was expected and what was received.
    """


class ResourceExhaustedError(LossdError, code=grpc.StatusCode.RESOURCE_EXHAUSTED):
    """The server's queue or message limit was hit (RESOURCE_EXHAUSTED); ``details`` names the limit."""


class DeadlineExceededError(LossdError, TimeoutError, code=grpc.StatusCode.DEADLINE_EXCEEDED):
    """The call's deadline (``timeout_s``) passed before the answer (DEADLINE_EXCEEDED); also a ``TimeoutError``."""


class UnavailableError(LossdError, ConnectionError, code=grpc.StatusCode.UNAVAILABLE):
    """No server could be reached, or it is shutting down (UNAVAILABLE); also a ``ConnectionError``.

    The clients retry it with backoff (``retries``) before raising it.
    """


class CancelledError(LossdError, code=grpc.StatusCode.CANCELLED):
    """The call was cancelled, by the client or by a draining server (CANCELLED)."""


class UnauthenticatedError(LossdError, PermissionError, code=grpc.StatusCode.UNAUTHENTICATED):
    """The call's credentials were refused (UNAUTHENTICATED); also a ``PermissionError``."""


class InternalError(LossdError, code=grpc.StatusCode.INTERNAL):
    """The server failed while evaluating a valid request (INTERNAL)."""


#: The header fields that describe a tensor whose rows follow in the chunks: ``<name>_dtype``, ``<name>_shape``.
_ROW_TENSOR_PARTS = ("_dtype", "_shape")


def unary_field(field: str) -> str:
    """The field of the unary request (EvaluateRequest, CompareRequest) that a chunked call's
    header field ``field`` stands for: the inverse of ``header_field`` in the server's
    ``server/lossd_server/header_fields.py``, which names the header's fields in the errors of
    EvaluateChunked and CompareChunked.

    - ``header.input_dtype`` and ``header.input_shape`` -> ``input`` (the same for ``reference_*``
      and ``candidate_*``: the tensor whose rows follow in the chunks);
    - any other ``header.X`` -> ``X``: ``header.target`` -> ``target``, ``header.target.data`` ->
      ``target.data``, ``header.options.top_k`` -> ``options.top_k``, ``header.id`` -> ``id``;
    - anything else stays as it is: a bare ``header`` (only chunked calls have one) and the
      chunks' row fields (``input_rows``, ``reference_rows``, ``candidate_rows``).
    """
    if not field.startswith("header."):
        return field
    name, dot, rest = field.removeprefix("header.").partition(".")
    for part in _ROW_TENSOR_PARTS:
        if name.endswith(part) and len(name) > len(part):
            return name.removesuffix(part) + dot + rest
    return name + dot + rest


def error_for(code: grpc.StatusCode, details: str) -> LossdError:
    """The exception for a status code (LossdError itself for codes without their own class).

    ``details`` that start with a chunked call's header field (the text before the first ``": "``)
    name the unary request's field instead (:func:`unary_field`), the rest unchanged: the same
    mistake reads the same whether the client sent the request whole or in chunks.
    """
    cls = _BY_CODE.get(code, LossdError)
    return cls(_unary_details(details), code)


def _unary_details(details: str) -> str:
    return _renamed(details, unary_field)


def _renamed(details: str, rename: Callable[[str], str]) -> str:
    """``details`` with the field it starts with (the text before the first ``": "``) renamed, the rest unchanged."""
    field, sep, rest = details.partition(": ")
    return rename(field) + sep + rest if sep else details


def caller_field(field: str, names: Mapping[str, str]) -> str:
    """The request's ``field`` (a unary request's, as :func:`unary_field` gives it) under the name of
    the caller's argument that it carries: its first part renamed by ``names`` (``{"target": "tokens"}``:
    ``target`` -> ``tokens``, ``target.data`` -> ``tokens.data``), any other field as it is."""
    name, dot, rest = field.partition(".")
    return names.get(name, name) + dot + rest


class _CallerFields:
    """The context manager of :func:`caller_fields` (a class: cheaper than a generator-based one on
    every ``cross_entropy``-like call, which passes no names)."""

    __slots__ = ("names",)

    def __init__(self, names: Mapping[str, str] | None) -> None:
        self.names = names

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        names = self.names
        if names and isinstance(exc, LossdError):
            exc.details = _renamed(exc.details, lambda field: caller_field(field, names))
            exc.args = (exc.details,)
        return False  # the same exception goes on


def caller_fields(names: Mapping[str, str] | None) -> _CallerFields:
    """Raise a LossdError of the block naming the caller's arguments (:func:`caller_field`), the same
    exception (type, code, cause) with the rest of its message unchanged: for the helpers that send an
    argument as a request field of another name (``perplexity(logits, tokens)`` sends ``input`` and
    ``target``), so that the same argument is named the same whether the client or the server found
    it wrong (``None``: the caller's names are the request's)."""
    return _CallerFields(names)


#: The most characters of a server's short text (an id) that an exception message shows.
MAX_SHOWN_CHARS = 200
#: The most characters of a server's error message that an exception carries: far above any of
#: lossd's own (a few hundred characters, shapes of up to 32 axes included), far below what a
#: buggy server can send (a 100 MB message was copied whole into the exception).
MAX_DETAILS_CHARS = 4096


def bounded(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """Server-controlled ``text`` cut to ``limit`` characters, with a note of its full length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters in all)"


def shown(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``repr`` of server-controlled ``text`` cut to ``limit`` characters (:func:`bounded`)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters in all)"


def from_rpc_error(exc: grpc.RpcError) -> LossdError:
    """The exception for a failed gRPC call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_for(code, bounded(details or code.name, MAX_DETAILS_CHARS))


def from_status_value(value: int, details: str) -> LossdError:
    """The exception for a numeric status code (a stream item's ItemError): LossdError itself
    (code UNKNOWN) for a code gRPC does not have, InternalError for code 0 (OK), which is no
    error; the server's message cut to MAX_DETAILS_CHARS."""
    if value == grpc.StatusCode.OK.value[0]:
        return InternalError(f"the server's answer: error has code 0 (OK), which is no error code; its message: {shown(details)}")
    details = bounded(details, MAX_DETAILS_CHARS)
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return error_for(code, details)
    return LossdError(_unary_details(details))


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Raise a grpc.RpcError from the block as its LossdError (``from`` the RpcError); sync or async calls alike."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc
