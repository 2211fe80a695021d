"""Test session setup.

Triton decides between compiled kernels and its CPU interpreter when `triton.language` is first
imported, and timm imports it as a side effect. Without a GPU only the interpreter works, so set
it before anything imports Triton.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Caches (text embeddings) go to a fresh folder per session: no state from the user's ~/.cache leaks in.
os.environ["CORRCLIP_CACHE"] = tempfile.mkdtemp(prefix="corrclip-test-cache-")


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty comes back full of NaN / -1, so an element a kernel forgets to write shows up."""
    empty = torch.empty

    def poisoned_empty(*size, **kw):
        t = empty(*size, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
