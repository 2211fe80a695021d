"""Text embeddings of a vocabulary: 80 templates per query (spec step 3), cached in memory and on disk.

Each prompt is encoded and L2-normalized; the 80 of a query are averaged and renormalized.

The disk cache holds one safetensors file per (text tower, template set, queries, precision): the
text tower of 80 templates x every class name costs seconds on a CPU in every process otherwise.
Files are written to a temporary name and renamed into place, so concurrent writers never leave a
torn file; an unreadable file is recomputed. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..templates import IMAGENET_TEMPLATES
from ..vocab import Vocabulary


def default_cache_dir() -> Path:
    """$CORRCLIP_CACHE/text, else ~/.cache/corrclip/text."""
    return Path(os.environ.get("CORRCLIP_CACHE") or Path.home() / ".cache" / "corrclip") / "text"


class TextCache:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(path)["embeddings"]
        except (SafetensorError, OSError, KeyError, ValueError):
            return None  # torn or foreign file: recompute and overwrite

    def save(self, key: str, embeddings: torch.Tensor, about: dict) -> None:
        from safetensors.torch import save_file

        tmp = self.folder / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({"embeddings": embeddings.detach().cpu().contiguous()}, str(tmp),
                      metadata={"about": json.dumps(about, ensure_ascii=False)})
            os.replace(tmp, self.path(key))
        except OSError as e:  # a read-only or full cache folder must not stop segmentation
            tmp.unlink(missing_ok=True)
            warnings.warn(f"text embedding cache {self.folder} is not writable ({e}); continuing without it",
                          stacklevel=2)


class TextEmbedder:
    """`identity` names the text tower's weights (None: no disk cache, e.g. an anonymous encoder);
    `variant` names anything else that changes the numbers (the precision)."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable, device: torch.device,
                 chunk: int = 1024, *, identity: str | None = None, cache: TextCache | None = None,
                 variant: str = "fp32", max_cached: int = 64):
        self.encode = encode  # token ids [P, L] -> embeddings [P, E]
        self.tokenizer = tokenizer
        self.device = device
        self.chunk = chunk
        self.identity, self.disk, self.variant = identity, cache, variant
        # In memory, the least recently used vocabularies are dropped past max_cached: a server that
        # sees endless new class lists must not grow without bound.
        self.max_cached = max_cached
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def disk_key(self, vocab: Vocabulary) -> str:
        templates = hashlib.sha256("\n".join(IMAGENET_TEMPLATES).encode()).hexdigest()
        blob = json.dumps({"text_tower": self.identity, "templates": templates, "queries": list(vocab.queries),
                           "variant": self.variant}, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @torch.inference_mode()
    def __call__(self, vocab: Vocabulary) -> torch.Tensor:
        """-> [Q, E] float32, one normalized row per query of the vocabulary."""
        key = vocab.key()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        disk = self.disk if self.identity is not None else None
        emb = disk.load(self.disk_key(vocab)) if disk is not None else None
        if emb is None or emb.shape[0] != vocab.num_queries:
            emb = self._compute(vocab)
            if disk is not None:
                disk.save(self.disk_key(vocab), emb, {"text_tower": self.identity, "queries": list(vocab.queries)})
        self._cache[key] = emb.to(self.device)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return self._cache[key]

    def _compute(self, vocab: Vocabulary) -> torch.Tensor:
        prompts = [t.format(q) for q in vocab.queries for t in IMAGENET_TEMPLATES]
        tokens = self.tokenizer(prompts)
        rows = []
        for part in tokens.split(self.chunk):
            # The text tower is causal and pools at end-of-text: trimming after the longest
            # prompt of the chunk changes nothing and saves most of the work.
            part = part[:, : int(part.argmax(dim=-1).max()) + 1].to(self.device)
            rows.append(F.normalize(self.encode(part).float(), dim=-1))
        emb = torch.cat(rows).view(vocab.num_queries, len(IMAGENET_TEMPLATES), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)
