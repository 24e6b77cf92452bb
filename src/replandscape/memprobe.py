"""Peak anonymous memory of this process, sampled while a stage runs.

A claim such as "no rank holds the whole model" is shown by a measurement, not by the design:
``REPLANDSCAPE_PEAK_MEMORY=DIR`` makes every stage run under :func:`track_peak_memory`, which writes
``DIR/<stage>.rank<R>.json`` with this rank's peak ``RssAnon`` (heap and anonymous mappings, i.e.
tensors; file-backed pages such as memory-mapped safetensors shards are not counted, since the kernel
can drop them at any time) and the baseline before the stage started. Linux only (``/proc``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV_VAR = "REPLANDSCAPE_PEAK_MEMORY"


def rss_anon_bytes() -> int:
    """Current anonymous resident memory of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler:
    """Samples :func:`rss_anon_bytes` in a daemon thread every ``interval_s`` seconds.

    Sampling misses peaks shorter than the interval; 2 ms is far below the time any load or
    forward pass of a model worth measuring holds its memory.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.baseline = rss_anon_bytes()
        self.peak = self.baseline
        self.trace: list[tuple[float, int]] = []
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)

    def _loop(self) -> None:
        last = -1.0
        while not self._stop.is_set():
            now = rss_anon_bytes()
            if now > self.peak:
                self.peak = now
            t = time.perf_counter() - self._t0
            if t - last >= 0.05:  # a coarse timeline, to see which phase holds the memory
                self.trace.append((round(t, 3), now))
                last = t
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def _rank() -> int:
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


@contextmanager
def track_peak_memory(stage: str) -> Iterator[None]:
    """Record this rank's peak anonymous memory during ``stage`` when ``REPLANDSCAPE_PEAK_MEMORY``
    names a folder; otherwise do nothing."""
    folder = os.environ.get(ENV_VAR)
    if not folder:
        yield
        return
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        yield
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "rank": _rank(), "peak_anon_bytes": sampler.peak,
              "baseline_anon_bytes": sampler.baseline, "seconds": time.perf_counter() - t0,
              "trace_s_bytes": sampler.trace}
    (out / f"{stage}.rank{_rank()}.json").write_text(json.dumps(record) + "\n")
