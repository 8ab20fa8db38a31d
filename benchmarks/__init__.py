"""`make bench`: lossd against in-process torch and a naive unbatched gRPC server.

One module per concern: ``servers`` (launching servers, RSS, /metrics), ``workloads`` (request
pools), ``drivers`` (load generators), ``report`` (table and JSON), ``naive_server`` (the baseline).
A new section (e.g. large requests) adds a workload and calls the same drivers and helpers.
"""
