"""The large-request chart: throughput and peak memory per path, one bar per dtype (matplotlib, Agg)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_line(torch_version: str, device: str) -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch_version}, device {device}"


def _throughput_label(r: dict | None) -> str:
    if not r:
        return ""
    floor = f"  floor x{r['ratio_to_floor']:.2f}" if r.get("ratio_to_floor") is not None else ""
    return f"{r['gb_per_s']:.2f} GB/s  torch x{r['ratio_to_torch']:.2f}{floor}"


def plot_large(result: dict, path: str, subtitle: str) -> None:
    """Two panels: end-to-end GB/s (bars labelled with the ratios to in-process torch and to the floor) and peak memory above idle."""
    rows = result["rows"]
    paths = list(dict.fromkeys(r["config"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    cell = {(r["config"], r["dtype"]): r for r in rows}
    height = 0.8 / len(dtypes)
    fig, (ax_tp, ax_mem) = plt.subplots(1, 2, figsize=(15, 1.1 * len(paths) + 2.2), sharey=True)
    for i, dtype in enumerate(dtypes):
        ys = [p + (i - (len(dtypes) - 1) / 2) * height for p in range(len(paths))]
        got = [cell.get((p, dtype)) for p in paths]
        label = f"{dtype} ({got[0]['bytes'] / 1e6:.0f} MB)" if got[0] else dtype
        tp = ax_tp.barh(ys, [r["gb_per_s"] if r else 0 for r in got], height, label=label)
        ax_tp.bar_label(tp, labels=[_throughput_label(r) for r in got], padding=3, fontsize=8)
        mem = ax_mem.barh(ys, [r["peak_above_idle_mib"] if r else 0 for r in got], height, label=label)
        ax_mem.bar_label(mem, labels=[f"{r['peak_above_idle_mib']:.0f} MiB ({r['peak_ratio']:.2f}x input)" if r else "" for r in got], padding=3, fontsize=8)
    ax_tp.set_yticks(range(len(paths)), paths)
    ax_tp.invert_yaxis()
    ax_tp.set_xlabel("end-to-end GB/s (input bytes / wall time)\nlabels: throughput x in-process F.cross_entropy's, x the floor's (same dtype)")
    ax_mem.set_xlabel("peak RSS above idle, MiB (in-process rows: the process; gRPC rows: the server)")
    for ax in (ax_tp, ax_mem):
        ax.set_xlim(0, ax.get_xlim()[1] * 1.6)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    ax_tp.set_title("throughput")
    ax_mem.set_title("peak memory")
    fig.suptitle(f"lossd: one 2048x32000 cross_entropy request, reduction='none' (best of {result.get('repeats', '?')})\n{subtitle}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
