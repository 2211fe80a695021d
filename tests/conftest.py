"""Test session setup.

Triton decides between compiled kernels and its CPU interpreter when it is first imported, and timm imports it as
a side effect. Without a GPU only the interpreter works, so set it before anything imports Triton.
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Caches (text embeddings) go to a fresh folder per session: no state from the user's ~/.cache leaks in.
os.environ["CORRCLIP_CACHE"] = tempfile.mkdtemp(prefix="corrclip-test-cache-")

from triton_support import device_skip_reason  # noqa: E402  (after TRITON_INTERPRET is settled)

# Files whose module fixtures export whole bundles go first, so that two workers (`--dist loadfile`)
# end together instead of one starting the longest file last.
FIRST = ("test_export.py", "test_methods.py", "test_registry.py", "test_serve.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))
    if os.environ.get("CORRCLIP_SLOW") != "1":  # full-size and second-compile runs: opt-in, CI's 15 minutes
        skip = pytest.mark.skip(reason="slow: set CORRCLIP_SLOW=1 to run it")
        for item in items:
            if item.get_closest_marker("slow"):
                item.add_marker(skip)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """Where a kernel test runs: "cpu" = the kernels interpreted (TRITON_INTERPRET=1, no GPU or forced), "cuda" =
    compiled on the GPU. One of the two runs in a process, the other is skipped with the reason. Inputs are made
    on the CPU and moved; references run on the same device with TF32 off, so the tolerances mean the same."""
    reason = device_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device(request.param)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty comes back full of NaN / -1, so an element a kernel forgets to write shows up."""
    empty = torch.empty

    def poisoned_empty(*size, **kw):
        t = empty(*size, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
