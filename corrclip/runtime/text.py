"""Text embeddings of a vocabulary: 80 templates per query, cached per vocabulary (spec step 3).

Each prompt is encoded and L2-normalized; the 80 of a query are averaged and renormalized.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..templates import IMAGENET_TEMPLATES
from ..vocab import Vocabulary


class TextEmbedder:
    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable, device: torch.device,
                 chunk: int = 1024, max_cached: int = 64):
        self.encode = encode  # token ids [P, L] -> embeddings [P, E]
        self.tokenizer = tokenizer
        self.device = device
        self.chunk = chunk
        # Least recently used vocabularies are dropped past max_cached: a server that sees endless
        # new class lists must not grow without bound.
        self.max_cached = max_cached
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.inference_mode()
    def __call__(self, vocab: Vocabulary) -> torch.Tensor:
        """-> [Q, E] float32, one normalized row per query of the vocabulary."""
        key = vocab.key()
        if key not in self._cache:
            prompts = [t.format(q) for q in vocab.queries for t in IMAGENET_TEMPLATES]
            tokens = self.tokenizer(prompts)
            rows = []
            for part in tokens.split(self.chunk):
                # The text tower is causal and pools at end-of-text: trimming after the longest
                # prompt of the chunk changes nothing and saves most of the work.
                part = part[:, : int(part.argmax(dim=-1).max()) + 1].to(self.device)
                rows.append(F.normalize(self.encode(part).float(), dim=-1))
            emb = torch.cat(rows).view(vocab.num_queries, len(IMAGENET_TEMPLATES), -1).mean(dim=1)
            self._cache[key] = F.normalize(emb, dim=-1)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]
