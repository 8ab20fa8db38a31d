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
    client_cpu_us: float | None = None
    server_cpu_us: float | None = None
    batch_requests_mean: float | None = None
    batch_rows_mean: float | None = None
    batches: int | None = None
    server_peak_rss_mib: float | None = None
    ratio_to_naive: float | None = None
    ratio_to_floor: float | None = None
    server_cpu_ratio_to_floor: float | None = None

    @classmethod
    def of(cls, workload: str, config: str, in_flight: int, m: Measurement, **extra) -> Row:
        return cls(
            workload, config, in_flight, m.count, m.errors, m.req_per_s, m.rows_per_s, m.percentile_ms(50), m.percentile_ms(99),
            client_cpu_us=m.client_cpu_us, server_cpu_us=m.server_cpu_us, **extra,
        )


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b and not math.isnan(a) and not math.isnan(b) else None


def add_ratios(rows: list[Row], floor: str, naive: str) -> None:
    """Same-workload ratios: req/s to the floor's and to the naive server's, server CPU per call to the floor's."""
    floors = {r.workload: r for r in rows if r.config == floor}
    naives = {r.workload: r for r in rows if r.config == naive}
    for r in rows:
        f, n = floors.get(r.workload), naives.get(r.workload)
        r.ratio_to_floor = _ratio(r.req_per_s, f.req_per_s) if f else None
        r.ratio_to_naive = _ratio(r.req_per_s, n.req_per_s) if n else None
        r.server_cpu_ratio_to_floor = _ratio(r.server_cpu_us, f.server_cpu_us) if f else None


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return format("-", ">" + spec.split(".")[0])
    return format(v, spec)


def table(rows: list[Row]) -> str:
    head = (
        f"{'workload':<26} {'config':<30} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'srv us/call':>11} {'cli us/call':>11} "
        f"{'x floor':>7} {'x (b)':>6} {'srv CPU x floor':>15} {'batch req':>9} {'batch rows':>10} {'peak RSS MiB':>12}"
    )
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        if last is not None and r.workload != last:
            lines.append("")
        last = r.workload
        lines.append(
            f"{r.workload:<26} {r.config:<30} {_fmt(r.req_per_s, '7.0f')} {_fmt(r.p50_ms, '7.2f')} {_fmt(r.p99_ms, '7.2f')} "
            f"{_fmt(r.server_cpu_us, '11.0f')} {_fmt(r.client_cpu_us, '11.0f')} {_fmt(r.ratio_to_floor, '7.2f')} "
            f"{_fmt(r.ratio_to_naive, '6.2f')} {_fmt(r.server_cpu_ratio_to_floor, '15.2f')} {_fmt(r.batch_requests_mean, '9.1f')} "
            f"{_fmt(r.batch_rows_mean, '10.0f')} {_fmt(r.server_peak_rss_mib, '12.0f')}"
        )
    return "\n".join(lines)


def write_json(path: str, meta: dict, rows: list[Row], sections: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows], **sections}, f, indent=2)
        f.write("\n")
