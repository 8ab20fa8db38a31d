"""A dead worker's prometheus-client files folded into one archive per type (no grpc, no torch).

Under ``--workers N`` every worker writes its collectors to memory-mapped files named after its pid
in the multiprocess directory (:mod:`lossd_server.multiproc_dir`): ``counter_<pid>.db``,
``histogram_<pid>.db``, ``gauge_livesum_<pid>.db``, ... A dead worker's live gauges go
(``mark_process_dead``), but its counts must stay in the sums (a counter that goes down is a reset
to Prometheus), so its counter and histogram files used to stay too: two files per restart, with no
bound, all read by every scrape. Instead, once a worker is dead, :func:`fold` adds its values into
``<type>_archive.db`` and removes its files; the directory then holds the live workers' files and
one archive per type, whatever the number of restarts.

Only the files whose values the collector adds up over the processes are folded: counters,
histograms (buckets, ``_sum`` and ``_count``, not cumulative in the files), summaries and
``multiprocess_mode="sum"`` gauges. The other gauge modes are left as they are: ``live*`` ones go
with their process, ``min``/``max``/``mostrecent``/``all`` are not sums. The collector takes a
file's type from its name up to the first ``_`` (and a gauge's mode from the second part, its pid
from the third), so ``counter_archive.db`` reads as counters and ``gauge_sum_archive.db`` as sum
gauges of a process called ``archive``; :data:`lossd_server.multiproc_dir._FILE_PID` finds no pid
in them.

A scrape must see a dead worker's values exactly once: not twice (archive written, its files not
removed yet) and not never (its files removed, archive not written yet). The supervisor serves
``/metrics`` itself, so :class:`FoldingCollector` collects and folds under one lock.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

log = logging.getLogger("lossd")

#: The file prefixes whose values MultiProcessCollector sums over the processes, dead ones included.
SUMMED = ("counter", "histogram", "summary", "gauge_sum")
#: What stands for the pid in an archive's name.
ARCHIVE = "archive"


def archive_path(directory: str, prefix: str) -> str:
    return os.path.join(directory, f"{prefix}_{ARCHIVE}.db")


def read_sums(paths: Iterable[str]) -> dict[str, tuple[float, float]]:
    """Key -> (sum of the values, latest timestamp) over the prometheus-client files ``paths``."""
    from prometheus_client.mmap_dict import MmapedDict

    sums: dict[str, tuple[float, float]] = {}
    for path in paths:
        for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(path):
            total, latest = sums.get(key, (0.0, 0.0))
            sums[key] = (total + value, max(latest, timestamp))
    return sums


def write_file(path: str, values: dict[str, tuple[float, float]]) -> None:
    """Replace ``path`` by a prometheus-client file holding ``values``, in one rename (a reader sees
    the old file or the new one). The new file is written first under a name the collector's
    ``*.db`` does not match."""
    from prometheus_client.mmap_dict import MmapedDict

    temporary = path + ".new"
    if os.path.exists(temporary):  # left by a failed fold: MmapedDict would keep its keys
        os.remove(temporary)
    try:
        mmaped = MmapedDict(temporary)
        try:
            for key, (value, timestamp) in values.items():
                mmaped.write_value(key, value, timestamp)
        finally:
            mmaped.close()
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def fold(directory: str, pid: int) -> list[str]:
    """Add the summed files of the dead process ``pid`` into the archives and remove them; the files
    removed. Not safe against a concurrent scrape by itself (:meth:`FoldingCollector.process_dead`).
    A file that cannot be folded (a full disk) stays where it was, its values counted once."""
    removed = []
    for prefix in SUMMED:
        source = os.path.join(directory, f"{prefix}_{pid}.db")
        if not os.path.exists(source):
            continue
        archive = archive_path(directory, prefix)
        parked = source[: -len(".db")] + ".folding"  # out of the collector's *.db until the archive holds it
        try:
            values = read_sums([archive, source] if os.path.exists(archive) else [source])
            os.rename(source, parked)
        except (OSError, RuntimeError) as exc:  # RuntimeError: prometheus-client's "file is corrupted"
            log.warning("could not fold the metrics file %s into %s (it stays): %s", source, archive, exc)
            continue
        try:
            write_file(archive, values)
        except OSError as exc:
            log.warning("could not fold the metrics file %s into %s (it stays): %s", source, archive, exc)
            try:
                os.replace(parked, source)
            except OSError as again:  # its values are missing from the sums from now on
                log.error("could not put the metrics file %s back: %s", source, again)
            continue
        try:
            os.remove(parked)
        except OSError:
            pass  # read by nobody; removed with the directory
        removed.append(source)
    return removed


class FoldingCollector:
    """prometheus-client's MultiProcessCollector over ``directory``, whose scrapes and folds of dead
    processes' files take one lock (register it instead of the collector itself)."""

    def __init__(self, directory: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = directory
        self.collector = MultiProcessCollector(None, path=directory)
        self.lock = threading.Lock()

    def collect(self) -> list:
        with self.lock:
            return list(self.collector.collect())

    def process_dead(self, pid: int) -> list[str]:
        """The process ``pid`` is dead: drop its live gauges, fold its summed files; those folded."""
        from prometheus_client.multiprocess import mark_process_dead

        with self.lock:
            mark_process_dead(pid, self.directory)
            return fold(self.directory, pid)
