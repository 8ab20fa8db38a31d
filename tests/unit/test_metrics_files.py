"""lossd_server.metrics_files: dead processes' prometheus-client files folded into archives.

The files are written by prometheus-client itself (its multiprocess value class, with chosen pids)
in a temporary directory, and read back by its MultiProcessCollector, as the supervisor's /metrics does.
"""

from __future__ import annotations

import os
import threading

import pytest
from lossd_server import metrics_files, multiproc_dir
from prometheus_client import Counter, Gauge, Histogram, Summary, values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector


@pytest.fixture
def directory(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return tmp_path


def write_as(monkeypatch, pid: int, counts: dict[str, float], observations: list[float], gauges: dict[str, float] | None = None) -> None:
    """What a process ``pid`` writes: lossd_requests_total{code} += counts, every observation in a
    histogram and a summary, and gauges of every summed and unsummed mode."""
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: pid))
    requests = Counter("lossd_requests", "calls", ["code"], registry=None)
    for code, n in counts.items():
        requests.labels(code).inc(n)
    latency = Histogram("lossd_latency_seconds", "latency", buckets=(0.1, 1.0), registry=None)
    summary = Summary("lossd_size_bytes", "sizes", registry=None)
    for x in observations:
        latency.observe(x)
        summary.observe(x)
    for mode, value in (gauges or {}).items():
        Gauge(f"lossd_g_{mode}", "g", registry=None, multiprocess_mode=mode).set(value)


def scrape(directory) -> dict[tuple, float]:
    collector = MultiProcessCollector(None, path=str(directory))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in collector.collect() for s in m.samples}


def raw(path) -> dict[str, float]:
    return {key: value for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(path))}


def db_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".db"))


def test_two_dead_pids_and_an_archive_add_up_exactly_and_a_key_of_one_file_survives(directory, monkeypatch):
    write_as(monkeypatch, 100, {"OK": 2, "CANCELLED": 1}, [0.0625], {"sum": 1.5})
    assert metrics_files.fold(str(directory), 100) == [
        str(directory / f"{p}_100.db") for p in ("counter", "histogram", "summary", "gauge_sum")
    ]
    archive = raw(directory / "counter_archive.db")
    write_as(monkeypatch, 101, {"OK": 3}, [0.5, 2.0], {"sum": 2.25, "max": 7.0, "livesum": 4.0})
    write_as(monkeypatch, 102, {"OK": 5, "INTERNAL": 7}, [0.5], {"sum": 0.5, "max": 9.0, "livesum": 1.0})
    write_as(monkeypatch, 103, {"OK": 11}, [3.0])  # alive
    before = scrape(directory)  # every value a sum of powers of 2: exact in any order
    dead = [raw(directory / f"counter_{pid}.db") for pid in (101, 102)]
    expected = {key: archive.get(key, 0.0) + dead[0].get(key, 0.0) + dead[1].get(key, 0.0) for key in {*archive, *dead[0], *dead[1]}}

    metrics_files.fold(str(directory), 101)
    metrics_files.fold(str(directory), 102)

    assert raw(directory / "counter_archive.db") == expected
    after = scrape(directory)
    assert after == before
    assert after[("lossd_requests_total", (("code", "OK"),))] == 2 + 3 + 5 + 11
    assert after[("lossd_requests_total", (("code", "INTERNAL"),))] == 7  # only in pid 102's file
    assert after[("lossd_requests_total", (("code", "CANCELLED"),))] == 1  # only in the archive
    assert after[("lossd_latency_seconds_count", ())] == 5 and after[("lossd_latency_seconds_sum", ())] == 6.0625
    assert after[("lossd_latency_seconds_bucket", (("le", "1.0"),))] == 3
    assert after[("lossd_size_bytes_count", ())] == 5 and after[("lossd_g_sum", ())] == 4.25
    assert db_files(directory) == sorted(
        [f"{p}_archive.db" for p in ("counter", "histogram", "summary", "gauge_sum")]
        + ["counter_103.db", "histogram_103.db", "summary_103.db"]
        + ["gauge_livesum_101.db", "gauge_livesum_102.db", "gauge_max_101.db", "gauge_max_102.db"]  # not sums: left alone
    )
    assert not [name for name in os.listdir(directory) if not name.endswith(".db")]


def test_the_archives_name_no_pid_so_a_directory_of_dead_processes_still_goes():
    assert multiproc_dir._FILE_PID.search("counter_archive.db") is None
    assert multiproc_dir._FILE_PID.search("gauge_sum_archive.db") is None


def test_a_scrape_during_a_fold_waits_for_it_and_sees_each_value_once(directory, monkeypatch):
    """Between the steps of a fold (the dead file moved out of the collector's sight, the archive
    replaced, the moved file removed) the dead process is counted not at all, then once: a scrape
    started in any of these windows waits for the fold (its lock) and gets the totals of before."""
    write_as(monkeypatch, 201, {"OK": 4}, [0.5])
    write_as(monkeypatch, 202, {"OK": 6}, [0.5])
    files = metrics_files.FoldingCollector(str(directory))
    expected = scrape(directory)
    seen: list[dict] = []
    scrapers: list[threading.Thread] = []

    def scrape_once() -> None:
        seen.append({(s.name, tuple(sorted(s.labels.items()))): s.value for m in files.collect() for s in m.samples})

    def then_scrape(step):
        def patched(*args):
            step(*args)
            scrapers.append(threading.Thread(target=scrape_once))
            scrapers[-1].start()
            scrapers[-1].join(0.25)  # long enough to scrape here, were it not for the lock

        return patched

    for name in ("rename", "replace", "remove"):
        monkeypatch.setattr(metrics_files.os, name, then_scrape(getattr(os, name)))
    files.process_dead(201)
    monkeypatch.undo()
    for scraper in scrapers:
        scraper.join(60)
    assert len(scrapers) == 3 * 3 and seen == [expected] * len(scrapers)  # 3 steps for each of 3 files
    assert scrape(directory) == expected and db_files(directory) == [
        "counter_202.db",
        "counter_archive.db",
        "histogram_202.db",
        "histogram_archive.db",
        "summary_202.db",
        "summary_archive.db",
    ]


def test_a_file_that_cannot_be_folded_stays_and_counts_once(directory, monkeypatch):
    write_as(monkeypatch, 301, {"OK": 2}, [0.5])
    write_as(monkeypatch, 302, {"OK": 3}, [0.5])
    metrics_files.fold(str(directory), 301)
    before, files = scrape(directory), db_files(directory)
    (directory / "counter_archive.db.new").mkdir()  # where the new counter archive is written: it cannot be
    folded = ["histogram_302.db", "summary_302.db"]
    assert metrics_files.fold(str(directory), 302) == [str(directory / name) for name in folded]
    assert scrape(directory) == before and db_files(directory) == [name for name in files if name not in folded]
    assert "counter_302.db" in files
