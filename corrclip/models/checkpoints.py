"""Loading weights safely: official files by URL, local files, or seeded random weights.

Every model in this package takes a `weights` argument with one of three meanings:
  "official"  the checkpoint the research code uses, fetched into the torch hub cache;
  "random"    the same architecture with seeded random weights (air-gapped runs, latency work);
  a path      a local checkpoint file in the official format (.pth/.pt/.bin or .safetensors).

Checkpoints are read with `torch.load(weights_only=True)` or safetensors: never arbitrary pickles.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch


class WeightsError(RuntimeError):
    """A checkpoint could not be fetched or does not fit the architecture. The message says what to do."""


def hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def offline() -> bool:
    """Downloads switched off explicitly (CORRCLIP_OFFLINE=1, or Hugging Face's HF_HUB_OFFLINE=1)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("CORRCLIP_OFFLINE", "HF_HUB_OFFLINE"))


@functools.cache
def reachable(host: str, timeout: float = 3.0) -> bool:
    """One short connection attempt to host:443 per process. Behind a proxy the library's own client decides."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def require_download(url: str, what: str, flag: str) -> None:
    """Fails at once, in one line, when `what` (not cached) cannot be downloaded from url's host: downloads
    switched off, or the host unreachable. Libraries' own retry loops would spend tens of seconds first."""
    advice = f"Download it elsewhere and pass {flag} FILE, or use --weights random for a smoke run."
    if offline():
        raise WeightsError(f"{what} is not in the local cache and downloads are off (CORRCLIP_OFFLINE/HF_HUB_OFFLINE). "
                           + advice)
    host = urlparse(url).hostname or url
    if not reachable(host):
        raise WeightsError(f"{what} is not in the local cache and {host} cannot be reached from this machine. "
                           + advice)


def fetch(url: str, flag: str) -> Path:
    """Returns the local path of an official checkpoint, downloading it once into the hub cache.

    `flag` names the command-line option that takes a local file instead, for the error message.
    """
    target = hub_dir() / os.path.basename(url)
    if target.is_file():
        return target
    require_download(url, f"{os.path.basename(url)} ({url})", flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as e:  # noqa: BLE001 - any network failure gets the same advice
        raise WeightsError(
            f"could not download {os.path.basename(url)} from {url} ({type(e).__name__}). "
            f"Download it elsewhere and pass {flag} PATH, or use --weights random for a smoke run."
        ) from e
    return target


def load_state_dict(path: str | os.PathLike, *, nested_keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Reads a state dict from .safetensors or a torch checkpoint without unpickling objects.

    `nested_keys` are tried in order when the file wraps the weights (e.g. {"model": {...}}).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"{path} is not a readable safetensors file ({e})") from e
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(
                f"{path} is not a torch checkpoint that loads with weights_only=True ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}). Pass a state-dict file (.pth/.pt) or a .safetensors file."
            ) from e
    for key in nested_keys:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return sd


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, *, strict: bool = True) -> None:
    """Copies `sd` into `module`, turning shape and key mismatches into one readable WeightsError."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and sd[k].shape != v.shape]
    if wrong or (strict and (missing or unexpected)):
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} tensors of another shape (e.g. {wrong[0]})")
        if strict and missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if strict and unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise WeightsError(
            f"{source} does not fit {type(module).__name__}: " + "; ".join(parts)
            + ". Is it a checkpoint of another architecture? Check the backbone preset and the weights flag."
        )
    module.load_state_dict(sd, strict=strict)


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Builds random weights reproducibly without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
