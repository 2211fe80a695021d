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
    masks_given: bool = False  # every image brings a region map: no SAM is built (unless --sam names one)
    write_needs_image: bool = False  # Ray: ship the decoded image on to the write stage


class Worker:
    """One model replica and the settings it runs with."""

    def __init__(self, job: Job, *, warn: bool = False):
        from .cli_args import build_segmenter, warn_if_random

        self.job = job
        self.seg = build_segmenter(job.model_args, masks_given=job.masks_given)
        if warn:
            warn_if_random(self.seg)
        self.settings = self.seg.settings_for(job.preset, **job.overrides)
        engine = job.model_args.engine
        self.meta = {"method": self.seg.method, "backbone": self.seg.backbone.name, "identity": dict(self.seg.identity),
                     "random_weights": self.seg.random_weights, "engine": str(engine) if engine else None,
                     "backend": self.seg.backend, "settings": asdict(self.settings)}

    def __call__(self, image: np.ndarray, masks: np.ndarray | None) -> tuple[np.ndarray, dict[str, float]]:
        out = self.seg.run([image], self.job.vocab, self.settings, [masks])[0]
        return out.labels, dict(out.timings)


def needs_masks(args: argparse.Namespace) -> bool:
    """Whether every image must bring a region map: a region method with `--sam none` (decided from the
    flags, so a Ray driver can say it before any worker starts; a bundle's own SAM is known only later)."""
    from . import methods

    return args.engine is None and methods.get(args.method).uses_regions and args.sam == "none"


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
