"""The pieces of protobuf's wire format that lossd writes by hand, in one home for client and server:
the client writes requests whose tensor bytes stay views of the caller's arrays (``core.encode``), the
server writes large answers a slice at a time (``lossd_server.answers``). Everything else goes
through protobuf itself."""

from __future__ import annotations


def varint(value: int) -> bytes:
    """A non-negative int as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(number: int, nbytes: int) -> bytes:
    """The key (wire type 2) and length of a length-delimited field ``number`` of ``nbytes``."""
    return varint(number << 3 | 2) + varint(nbytes)
