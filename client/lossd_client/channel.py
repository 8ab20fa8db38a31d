"""Where a client connects and how: targets, load balancing and retries, message limits, TLS.

Both clients open their gRPC channel (``grpc`` or ``grpc.aio``) with :func:`channel_options` and
:func:`credentials`; nothing here sends anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc

SERVICE = "lossd.v1.LossService"
#: A call is replayable while its request messages fit this buffer (with gRPC's default, 256 KiB,
#: 1 MiB requests in flight on a crashed replica failed instead of being replayed). The buffer
#: keeps a call's serialised messages until the server answers.
RETRY_BUFFER_BYTES = 64 * 1024 * 1024
#: Reconnection backoff after a lost connection: gRPC's defaults (1 s growing 1.6x up to 120 s)
#: left a live client failing UNAVAILABLE for 3 s after a server that was away 20 s was back,
#: 11 s after 60 s away, while a new client connected at once. Capped here, a client tries again
#: at least every RECONNECT_BACKOFF_MAX_MS (one small connection attempt; nothing is sent).
RECONNECT_BACKOFF_INITIAL_MS = 250
RECONNECT_BACKOFF_MAX_MS = 2000


def service_config(*, retries: int = 5) -> str:
    """round_robin over every resolved address, and retries of UNAVAILABLE and CANCELLED with backoff.

    Evaluations are idempotent, so replaying a call that got no answer is safe. gRPC replays a
    call only before the server has answered anything (and only while its messages fit the
    per-call retry buffer, set to 64 MiB by the clients). A replica that shuts down cancels calls its
    transport received but its handlers never started: the client sees CANCELLED for those (seen
    in tests/test_replicas.py), so CANCELLED is retried too; a call the caller cancels itself
    is never retried.
    """
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": max(2, min(retries, 5)),
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                    },
                }
            ],
        }
    )


def normalise_target(target: str | Sequence[str]) -> str:
    """One address, a ``dns:///`` target, or several ``host:port`` IP addresses (round robin)."""
    if isinstance(target, str):
        return target
    addresses = list(target)
    if not addresses:
        raise ValueError("target: no address given")
    if len(addresses) == 1:
        return addresses[0]
    if all(_is_ipv4(a) for a in addresses):
        return "ipv4:" + ",".join(addresses)
    if all(a.startswith("[") and "]:" in a for a in addresses):
        return "ipv6:" + ",".join(addresses)
    raise ValueError(
        f"target: several addresses must all be IPv4 host:port or all [IPv6]:port, got {addresses}; "
        "for a name that resolves to several replicas use one dns:///name:port target"
    )


def _is_ipv4(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts)


def channel_options(max_message_bytes: int, retries: int, *, own_connection: bool = False) -> list[tuple[str, Any]]:
    """gRPC channel options: message limits both ways, the service config, retries and their
    buffer, the reconnection backoff.

    ``own_connection``: the channel gets its own subchannel pool (``grpc.use_local_subchannel_pool``),
    hence its own connections; by default gRPC shares one connection between every channel of the
    process with the same target and arguments. The clients ask for their own, always: a
    ``connections=k`` client needs k distinct ones, and a new client must not inherit another's
    failed connection, whose reconnection backoff (up to RECONNECT_BACKOFF_MAX_MS) outlasted the
    retries of its first calls (a client made once a restarted server was SERVING failed
    UNAVAILABLE "Connection refused" in 3 of 15 restarts).
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", service_config(retries=retries)),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
    ]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


def credentials(
    root_certificates: bytes | None, private_key: bytes | None, certificate_chain: bytes | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM bytes (mTLS with a key and chain); None for a plaintext channel."""
    if root_certificates is None and private_key is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain)
