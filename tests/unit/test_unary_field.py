"""The client's errors name the caller's fields: lossd_client.errors.unary_field undoes what
lossd_server.header_fields.header_field does to a chunked call's header errors."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from lossd_client._proto.lossd.v1 import loss_pb2 as pb
from lossd_client.errors import (
    InvalidArgumentError,
    LossdError,
    ResourceExhaustedError,
    caller_field,
    caller_fields,
    error_for,
    from_rpc_error,
    from_status_value,
    unary_field,
)
from lossd_server.header_fields import header_field

# (the chunked call's header, the unary request it stands for)
HEADERS = [(pb.ChunkHeader.DESCRIPTOR, pb.EvaluateRequest.DESCRIPTOR), (pb.CompareHeader.DESCRIPTOR, pb.CompareRequest.DESCRIPTOR)]
IDS = ["ChunkHeader", "CompareHeader"]


def _names(message: Descriptor, prefix: str = "", depth: int = 2) -> list[str]:
    """Every field of ``message`` and of its message fields (``options.weight.dtype``), dotted."""
    names = []
    for field in message.fields:
        name = prefix + field.name
        names.append(name)
        if field.type == FieldDescriptor.TYPE_MESSAGE and depth > 1:
            names += _names(field.message_type, name + ".", depth - 1)
    return names


@pytest.mark.parametrize(("header", "request_"), HEADERS, ids=IDS)
@pytest.mark.parametrize("dtype", [False, True], ids=["shape", "dtype"])
def test_every_unary_field_a_header_names_is_named_back(header, request_, dtype):
    """header_field then unary_field: the unary request's field again (``target``,
    ``options.top_k``, ``id``, ``input``), for every field of the request and of its options
    and tensors, except ``<tensor>.dtype`` / ``<tensor>.shape`` of a tensor whose rows follow in
    the chunks: the header has one field for each, named back as the tensor."""
    seen = set()
    for field in _names(request_):
        named = header_field(header, field, dtype)
        seen.add(named.removeprefix("header.").partition(".")[0])
        assert named.startswith("header."), (field, named)  # every field of the request is in the header
        name, _, rest = field.partition(".")
        in_rows = f"{name}_dtype" in header.fields_by_name
        assert unary_field(named) == (name if in_rows else field), (field, named)
    assert seen == set(header.fields_by_name), seen  # every header field stands for a unary one


@pytest.mark.parametrize(("header", "request_"), HEADERS, ids=IDS)
def test_every_header_field_is_named_back_to_the_one_that_names_it(header, request_):
    """unary_field then header_field: the header's field again, for every field of the header
    and of its options and target (``header.input_dtype``, ``header.options.weight.dtype``)."""
    for name in _names(header):
        field = "header." + name
        unary = unary_field(field)
        assert unary.partition(".")[0] in request_.fields_by_name, (field, unary)
        assert header_field(header, unary, dtype=name.endswith("_dtype")) == field, (field, unary)


@pytest.mark.parametrize(
    "field", ["header", "input_rows", "target_rows", "reference_rows", "candidate_rows", "target", "options.top_k", "id", ""]
)
def test_fields_no_header_has_stay(field):
    assert unary_field(field) == field
    assert (
        error_for(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: it was wrong: header.target: x").details
        == f"{field}: it was wrong: header.target: x"
    )


@pytest.mark.parametrize(
    ("details", "caller"),
    [
        ("header.target: Target 77 is out of bounds.", "target: Target 77 is out of bounds."),
        ("header.input_dtype: expected a floating dtype", "input: expected a floating dtype"),
        (
            "header.input_shape: size mismatch (got input: [2, 0, 4] with 0 classes",
            "input: size mismatch (got input: [2, 0, 4] with 0 classes",
        ),
        ("header.candidate_shape: header.x: y", "candidate: header.x: y"),  # only the field before the first ": "
        ("header.reference_dtype: dtype int32", "reference: dtype int32"),
        ("header.options.weight.dtype: unknown dtype enum value 99", "options.weight.dtype: unknown dtype enum value 99"),
        ("header.target.data: send it with the rows", "target.data: send it with the rows"),
        ("header.id: takes 2000 bytes (UTF-8)", "id: takes 2000 bytes (UTF-8)"),
        ("header: EvaluateChunked received no messages", "header: EvaluateChunked received no messages"),
        ("header.target without a colon", "header.target without a colon"),
        ("Deadline Exceeded", "Deadline Exceeded"),
    ],
)
def test_details_name_the_callers_field_on_every_path(details, caller):
    """error_for, from_rpc_error (sync and async calls) and from_status_value (stream items)."""

    class Failed(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self):
            return details

    for error in (
        error_for(grpc.StatusCode.INVALID_ARGUMENT, details),
        from_rpc_error(Failed()),
        from_status_value(grpc.StatusCode.INVALID_ARGUMENT.value[0], details),
    ):
        assert type(error) is InvalidArgumentError and error.details == str(error) == caller
    unknown = from_status_value(999, details)
    assert type(unknown) is LossdError and unknown.details == caller


LM = {"input": "logits", "target": "tokens"}


@pytest.mark.parametrize(
    ("details", "caller"),
    [
        ("target: Target 105 is out of bounds.", "tokens: Target 105 is out of bounds."),
        ("header.input_dtype: expected a floating dtype", "logits: expected a floating dtype"),
        ("target.data: input: x", "tokens.data: input: x"),  # only the field before the first ": ", its first part
        ("input_rows: 3 rows", "input_rows: 3 rows"),
        ("options.ignore_index: out of int64 range", "options.ignore_index: out of int64 range"),
        ("targets: not a field", "targets: not a field"),
        ("Deadline Exceeded", "Deadline Exceeded"),
    ],
)
def test_caller_fields_name_the_helpers_arguments(details, caller):
    """caller_fields renames the error of its block in place: its type, code and cause stay."""
    cause = ValueError("cause")
    with pytest.raises(LossdError) as info, caller_fields(LM):
        raise error_for(grpc.StatusCode.RESOURCE_EXHAUSTED, details) from cause
    assert type(info.value) is ResourceExhaustedError and info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details == str(info.value) == caller and info.value.__cause__ is cause
    if ": " in details:
        assert caller_field(unary_field(details.partition(": ")[0]), LM) == caller.partition(": ")[0]
    plain = error_for(grpc.StatusCode.INVALID_ARGUMENT, details).details
    with pytest.raises(LossdError) as same, caller_fields(None):  # no renames: the error as it was
        raise error_for(grpc.StatusCode.INVALID_ARGUMENT, details)
    assert same.value.details == plain
