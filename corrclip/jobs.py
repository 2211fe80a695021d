"""Many images through one model: read -> segment -> write, one image per model call.

A Job says what happens to each image (its `read` and `write` are module-level functions, so Ray
can ship them to other processes); `Worker` is one model replica; `run_local` streams tasks
through one Worker in this process, decoding the next images in a thread meanwhile.
`corrclip.distributed.run_ray` runs the same Job on a Ray cluster. One image per call keeps every
prediction independent of its neighbours, so any runner gives the same label maps.

Runners never raise for a bad image: they yield {"task": ..., "error": "..."} and the command
decides (`label` records it and goes on; `eval` stops, since a metric over fewer images misleads).
"""

from __future__ import annotations

import argparse
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .vocab import Vocabulary

# Bad images, label maps and dataset files raise ValueError subclasses (ImageError, DatasetError)
# or OSError; anything else is a bug and propagates.
DATA_ERRORS = (ValueError, OSError)
READ_AHEAD = 4  # images decoded ahead of the model in run_local


@dataclass
class Job:
    model_args: argparse.Namespace  # build_segmenter(model_args) in every worker
    vocab: Vocabulary
    preset: str | None  # settings: the preset's, with `overrides`
    read: Callable[[dict], tuple[np.ndarray, np.ndarray | None]]  # task -> (RGB image, region map or None)
    write: Callable[[dict, np.ndarray, np.ndarray, dict, dict], dict]  # (task, image, labels, timings, meta) -> result
    overrides: dict[str, Any] = field(default_factory=dict)
    write_needs_image: bool = False  # Ray: ship the decoded image on to the write stage


class Worker:
    """One model replica and the settings it runs with."""

    def __init__(self, job: Job, segmenter=None):
        from .cli_args import build_segmenter

        self.job = job
        self.seg = segmenter if segmenter is not None else build_segmenter(job.model_args)
        self.settings = settings_for(self.seg, job.preset, **job.overrides)
        engine = getattr(job.model_args, "engine", None)
        self.meta = {"method": self.seg.method, "backbone": self.seg.backbone.name, "identity": dict(self.seg.identity),
                     "engine": str(engine) if engine else None, "settings": asdict(self.settings)}

    def __call__(self, image: np.ndarray, masks: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        run = getattr(self.seg, "run", None) or self.seg.pipeline  # Segmenter.run once issue 9 lands
        out = run([image], self.job.vocab, self.settings, [masks])[0]
        return out.labels, dict(out.timings)


def settings_for(seg, preset: str | None, **overrides):
    pick = getattr(seg, "settings_for", None) or seg.default_settings  # renamed by issue 9
    return pick(preset, **overrides)


def needs_masks(args: argparse.Namespace) -> bool:
    """Whether every image must bring a region map: CorrCLIP with `--sam none` (decided from the flags,
    so a Ray driver can say it before any worker starts)."""
    return getattr(args, "engine", None) is None and args.method == "corrclip" and args.sam == "none"


def run_local(job: Job, tasks: Iterable[dict], worker: Worker) -> Iterator[tuple[dict, dict]]:
    """(result, worker meta) per task, in order; a result is write()'s dict, or {"task", "error"}."""

    def read(task: dict):
        try:
            return job.read(task)
        except DATA_ERRORS as e:
            return e

    tasks = iter(tasks)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="corrclip-read") as pool:
        ahead: deque = deque()

        def fill() -> None:
            while len(ahead) < READ_AHEAD and (task := next(tasks, None)) is not None:
                ahead.append((task, pool.submit(read, task)))

        fill()
        while ahead:
            task, future = ahead.popleft()
            fill()
            decoded = future.result()
            if isinstance(decoded, Exception):
                yield {"task": task, "error": str(decoded)}, worker.meta
                continue
            image, masks = decoded
            try:
                labels, timings = worker(image, masks)
                result = job.write(task, image, labels, timings, worker.meta)
            except DATA_ERRORS as e:
                result = {"task": task, "error": str(e)}
            yield result, worker.meta
