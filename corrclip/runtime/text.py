"""Text embeddings of a vocabulary: 80 templates per query, cached per vocabulary (spec step 3).

Each prompt is encoded and L2-normalized; the 80 of a query are averaged and renormalized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..templates import IMAGENET_TEMPLATES
from ..vocab import Vocabulary


class TextEmbedder:
    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable, device: torch.device,
                 chunk: int = 1024):
        self.encode = encode  # token ids [P, L] -> embeddings [P, E]
        self.tokenizer = tokenizer
        self.device = device
        self.chunk = chunk
        self._cache: dict[str, torch.Tensor] = {}

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
        return self._cache[key]
