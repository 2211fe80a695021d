"""A Job on Ray Data: read + decode (CPU tasks) -> segment (an actor pool, one model replica per actor,
one GPU each where the cluster has GPUs) -> write (CPU tasks). The driver only lists the tasks
and collects each image's small result.

Ray is an optional extra (`pip install 'corrclip[ray]'`). With `--ray` alone a local Ray is
started on demand; `--ray ADDRESS` joins a running cluster (e.g. `auto`, or `ray://head:10001`),
and then every node must see the input images and --out at the same paths (a shared filesystem).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .jobs import DATA_ERRORS, Job, Worker

RAY_MISSING = "--ray needs Ray Data: pip install 'corrclip[ray]' (or pip install 'ray[data]')"
LOCAL = "local"


class RayMissing(RuntimeError):
    pass


class RayRunError(RuntimeError):
    """The Ray pipeline itself failed (a worker could not start, a node died): one line, then the logs."""


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                   help="run on Ray Data: a local Ray started on demand (no ADDRESS), or a running cluster "
                        "(ADDRESS: auto, HOST:6379, ray://HOST:10001); put it after the other arguments")
    p.add_argument("--workers", type=int, default=None,
                   help="with --ray: model replicas (default: one per GPU in the cluster; 1 without GPUs)")


def require_ray() -> None:
    """Fails early (RayMissing, one line naming the extra) when --ray is asked for without Ray Data."""
    _import_ray()


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the data extra)
    except ImportError:
        raise RayMissing(RAY_MISSING) from None
    return ray


def connect(address: str) -> None:
    """Joins the cluster (or starts a local Ray) unless this process is already connected."""
    ray = _import_ray()
    if ray.is_initialized():
        return
    import corrclip

    # Ship this corrclip to the workers, so a cluster runs exactly the driver's code.
    runtime_env = {"py_modules": [str(Path(corrclip.__file__).parent)]}
    ray.init(address=None if address == LOCAL else address, runtime_env=runtime_env, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)


def _read_stage(row: dict, job: Job) -> dict:
    task = json.loads(row["task"])
    image, masks, error = np.zeros((0, 0, 3), np.uint8), None, ""
    try:
        image, masks = job.read(task)
    except DATA_ERRORS as e:
        error = str(e)
    # Ray columns keep one type: "no region map" travels as an empty array.
    masks = np.zeros((0, 0), np.int32) if masks is None else np.asarray(masks, np.int64)
    return {"task": row["task"], "image": image, "masks": masks, "error": error}


class _SegmentActor:
    """One model replica, built once per actor."""

    def __init__(self, job: Job):
        import ray
        import torch

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.job = job
        self.worker = Worker(job)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"task": [], "labels": [], "timings": [], "meta": [], "error": []}
        if self.job.write_needs_image:
            out["image"] = []
        for i, task in enumerate(batch["task"]):
            image = np.asarray(batch["image"][i])
            labels, timings, error = np.zeros((0, 0), np.int32), {}, str(batch["error"][i])
            if not error:
                masks = np.asarray(batch["masks"][i])
                try:
                    labels, timings = self.worker(image, masks if masks.size else None)
                except DATA_ERRORS as e:
                    error = str(e)
            out["task"].append(task)
            out["labels"].append(labels.astype(np.int32))
            out["timings"].append(json.dumps(timings))
            out["meta"].append(json.dumps(self.worker.meta))
            out["error"].append(error)
            if self.job.write_needs_image:
                out["image"].append(image)
        return out


def _write_stage(row: dict, job: Job) -> dict:
    task, error = json.loads(row["task"]), str(row["error"])
    meta = json.loads(row["meta"])
    if not error:
        image = np.asarray(row["image"]) if job.write_needs_image else None
        try:
            result = job.write(task, image, np.asarray(row["labels"]), json.loads(row["timings"]), meta)
        except DATA_ERRORS as e:
            error = str(e)
    if error:
        result = {"task": task, "error": error}
    return {"result": json.dumps(result), "meta": row["meta"]}


def run_ray(job: Job, tasks: list[dict], address: str, workers: int | None = None) -> Iterator[tuple[dict, dict]]:
    """(result, worker meta) per task, in completion order; results as in jobs.run_local."""
    ray = _import_ray()
    connect(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the command draws one bar of its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1)
    replicas = workers or max(1, gpus)
    if gpus:
        actor = {"num_gpus": 1, "num_cpus": 1}
    else:
        # Without GPUs the replicas share the CPUs, keeping one for the read and write tasks.
        actor = {"num_gpus": 0, "num_cpus": max(cpus - 1, 0.5) / replicas}
    if not tasks:
        return
    ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks])
    ds = ds.map(_read_stage, fn_kwargs={"job": job}, num_cpus=0.5)
    ds = ds.map_batches(_SegmentActor, fn_constructor_kwargs={"job": job}, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=replicas), **actor)
    ds = ds.map(_write_stage, fn_kwargs={"job": job}, num_cpus=0.5)
    try:
        for row in ds.iter_rows():
            yield json.loads(row["result"]), json.loads(row["meta"])
    except ray.exceptions.RayError as e:
        # Ray's message carries remote tracebacks; the cause is on its last line.
        cause = next((line for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
        raise RayRunError(f"the Ray pipeline failed: {cause.strip()} (full traceback in the Ray logs, "
                          "/tmp/ray/session_latest/logs on the head node)") from None


def ray_info() -> dict:
    """What the run used, for reports."""
    ray = _import_ray()
    res = ray.cluster_resources()
    return {"ray": ray.__version__, "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0)}
