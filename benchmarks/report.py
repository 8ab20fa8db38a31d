"""Result rows, the printed table and the JSON file."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

from .drivers import Measurement


@dataclass
class Row:
    workload: str
    config: str
    in_flight: int
    requests: int
    errors: int
    req_per_s: float
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    batch_requests_mean: float | None = None
    batch_rows_mean: float | None = None
    batches: int | None = None
    server_peak_rss_mib: float | None = None
    ratio_to_naive: float | None = None

    @classmethod
    def of(cls, workload: str, config: str, in_flight: int, m: Measurement, **extra) -> Row:
        return cls(workload, config, in_flight, m.count, m.errors, m.req_per_s, m.rows_per_s, m.percentile_ms(50), m.percentile_ms(99), **extra)


def add_ratios(rows: list[Row], baseline: str) -> None:
    base = {r.workload: r.req_per_s for r in rows if r.config == baseline}
    for r in rows:
        b = base.get(r.workload)
        r.ratio_to_naive = r.req_per_s / b if b else None


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def table(rows: list[Row]) -> str:
    head = f"{'workload':<26} {'config':<30} {'req/s':>9} {'rows/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>7} {'batch req':>9} {'batch rows':>10} {'peak RSS MiB':>12} {'x (b)':>6}"
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        if last is not None and r.workload != last:
            lines.append("")
        last = r.workload
        ratio_p = r.p99_ms / r.p50_ms if r.p50_ms and not math.isnan(r.p50_ms) else None
        lines.append(
            f"{r.workload:<26} {r.config:<30} {_fmt(r.req_per_s, '9.0f')} {_fmt(r.rows_per_s, '11.0f')} {_fmt(r.p50_ms, '8.2f')} "
            f"{_fmt(r.p99_ms, '8.2f')} {_fmt(ratio_p, '7.2f')} {_fmt(r.batch_requests_mean, '9.1f')} {_fmt(r.batch_rows_mean, '10.0f')} "
            f"{_fmt(r.server_peak_rss_mib, '12.0f')} {_fmt(r.ratio_to_naive, '6.2f')}"
        )
    return "\n".join(lines)


def write_json(path: str, meta: dict, rows: list[Row], sections: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows], **sections}, f, indent=2)
        f.write("\n")
