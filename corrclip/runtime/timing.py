"""Per-stage times that are honest on a GPU: CUDA events around each stage, read after one final
synchronize (no host clock around asynchronous work); plain host clocks on the CPU.

With `count_flops=True` each stage also runs under torch's FlopCounterMode (counted FLOPs of the
aten ops the stage dispatches; exported graphs run outside torch are not seen).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class StageTimer:
    def __init__(self, device: torch.device | str = "cpu", count_flops: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.flops: dict[str, int] | None = defaultdict(int) if count_flops else None
        self._depth = 0

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        counter = contextlib.nullcontext()
        if self.flops is not None and self._depth == 0:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
        self._depth += 1
        try:
            with counter:
                if self.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    yield
                    end.record()
                    self._events.append((stage, start, end))
                else:
                    t0 = time.perf_counter()
                    yield
                    self._seconds[stage] += time.perf_counter() - t0
        finally:
            self._depth -= 1
        if self.flops is not None and not isinstance(counter, contextlib.nullcontext):
            self.flops[stage] += counter.get_total_flops()

    @property
    def seconds(self) -> dict[str, float]:
        """Stage -> seconds (synchronizes once on CUDA to read the events)."""
        if self._events:
            torch.cuda.synchronize()
            for stage, start, end in self._events:
                self._seconds[stage] += start.elapsed_time(end) / 1000.0
            self._events.clear()
        return self._seconds


def median_seconds(fn, device: torch.device | str, warmup: int = 1, runs: int = 5) -> float:
    """Median seconds of `runs` calls of fn after `warmup` calls: CUDA events on a GPU, host clock on the CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
