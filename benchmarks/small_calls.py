"""Server-side cost of small unary calls: ``python -m benchmarks.small_calls [lossd flags]``.

8 client threads keep 8 futures each in flight against one lossd server for a fixed time and
print req/s. Used to profile the unary path: attach ``py-spy record -p <pid>`` (the server's pid
is printed) while it runs.
"""

from __future__ import annotations

import argparse
import threading
import time

import grpc
import numpy as np
from lossd_client import LossRequest, core
from lossd_client._proto.lossd.v1 import loss_pb2_grpc as pb_grpc

from . import servers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--futures", type=int, default=8)
    args, flags = parser.parse_known_args()
    rng = np.random.default_rng(0)
    msg, _ = core.build(LossRequest(rng.standard_normal((64, 1000), dtype=np.float32), rng.integers(0, 1000, 64)))
    with servers.start_lossd(*flags) as server, grpc.insecure_channel(server.address) as channel:
        print("server pid", server.proc.pid, flush=True)
        stub = pb_grpc.LossServiceStub(channel)
        for _ in range(100):
            stub.Evaluate(msg)
        stop = time.monotonic() + args.seconds
        counts = [0] * args.threads

        def worker(i: int) -> None:
            while time.monotonic() < stop:
                for f in [stub.Evaluate.future(msg) for _ in range(args.futures)]:
                    f.result()
                counts[i] += args.futures

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"{sum(counts) / (time.monotonic() - start):.0f} req/s (64x1000 fp32, {args.threads}x{args.futures} in flight)")


if __name__ == "__main__":
    main()
