"""Errors about a chunked call's header name the header's own fields.

A header is validated by the unary request's checks (:func:`.convert.decode_options`,
:func:`.engine.plan`, :func:`.engine.comparison.plan_comparison`), which name that request's
fields: ``input``, ``target``, ``options.top_k``. :func:`named_in` gives every error raised while a
header is validated the field the header has for it (as protobuf spells it), its message unchanged:

- a field the header has too gains the ``header.`` prefix: ``target`` -> ``header.target``,
  ``options.top_k`` -> ``header.options.top_k``;
- a tensor whose rows follow in the chunks is described by ``<name>_dtype`` and ``<name>_shape``
  fields: ``input`` -> ``header.input_dtype`` for a dtype torch rejects (:class:`.engine.InvalidDtype`,
  or an error naming ``input.dtype``), ``header.input_shape`` for anything else about it (the same
  for ``reference`` and ``candidate``);
- a field already named in the header (``header.id``, ``header.target.data``) stays as it is.

Errors about the row chunks are not validated here: they name the chunk's fields (``input_rows``).

``lossd_client.errors.unary_field`` is the inverse (the client reports these errors under the
names of the request its caller made; tests/unit/test_unary_field.py keeps the two in step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from google.protobuf.descriptor import Descriptor

from . import codec, engine


def header_field(header: Descriptor, field: str, dtype: bool = False) -> str:
    """The field of the header message ``header`` that the unary request's ``field`` is in
    (``dtype``: the error is about its dtype)."""
    if field == "header" or field.startswith("header."):
        return field
    name, _, rest = field.partition(".")
    if name in header.fields_by_name:
        return f"header.{field}"
    part = rest if rest in ("dtype", "shape") else "dtype" if dtype else "shape"
    if f"{name}_{part}" in header.fields_by_name:
        return f"header.{name}_{part}"
    return field


@contextmanager
def named_in(header: Descriptor) -> Iterator[None]:
    """Re-raise an InvalidInput or TensorError of the block naming the field of ``header`` (a
    header message's descriptor, e.g. ``ChunkHeader.DESCRIPTOR``) it is about."""
    try:
        yield
    except (engine.InvalidInput, codec.TensorError) as exc:
        field = header_field(header, exc.field, isinstance(exc, engine.InvalidDtype))
        if field == exc.field:
            raise
        raise type(exc)(field, exc.message) from None
