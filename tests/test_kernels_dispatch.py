"""One kernel dispatch (corrclip.kernels): which implementation each entry point runs, the custom ops that
torch.compile sees, the reference in exported graphs, the fallback when a kernel fails, the device guard, and the
`device` fixture of the kernel tests itself."""

import contextlib
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import triton_support
from triton_support import device_skip_reason, triton_mode

from corrclip import kernels
from corrclip.kernels import correlation, dispatch, merging, stitch_vote
from corrclip.runtime.preprocess import sliding_windows
from corrclip.runtime.regions import window_regions

# ---- the device fixture ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("param", "mode", "cuda", "runs"), [
    ("cpu", "interpreted", False, True),  # CI: no GPU, interpreter on
    ("cuda", "interpreted", False, False),
    ("cpu", "compiled", True, False),  # a GPU machine: Triton compiles, CPU tensors cannot run
    ("cuda", "compiled", True, True),
    ("cpu", "interpreted", True, True),  # a GPU machine with TRITON_INTERPRET=1 forced
    ("cuda", "interpreted", True, False),
    ("cpu", None, False, False),  # no Triton at all
])
def test_fixture_paths(monkeypatch, param, mode, cuda, runs):
    """Which path each parameter of the `device` fixture takes on each kind of machine."""
    monkeypatch.setattr(triton_support, "triton_mode", lambda: mode)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert (device_skip_reason(param) is None) == runs


def test_fixture_here(device):
    """The parameter that runs in this process: interpreted kernels on CPU tensors, or compiled ones on CUDA."""
    stitch_vote._triton()
    kernel = stitch_vote._gather_kernel
    expected = {"cpu": ("interpreted", "InterpretedFunction"), "cuda": ("compiled", "JITFunction")}[device.type]
    assert (triton_mode(), type(kernel).__name__) == expected
    regions = torch.tensor([0, 1, 2, 1, 0], device=device)
    labels = torch.tensor([4, 4, 4, 4, 3], device=device)
    kernel[(1,)](regions, torch.tensor([9, 7, 5], device=device), labels, 5, BLOCK=1024)
    assert labels.tolist() == [4, 7, 5, 7, 3]


# ---- the policy ------------------------------------------------------------------------------------------------------

def like(device: str, dtype=torch.float32):
    return SimpleNamespace(device=torch.device(device), dtype=dtype)  # all use_fused reads of a tensor


@pytest.mark.parametrize("op", sorted(dispatch.AUTO))
def test_policy(op):
    assert not kernels.use_fused(op, like("cpu"))  # auto: the reference on the CPU
    assert kernels.use_fused(op, like("cuda")) == (dispatch.AUTO[op] and dispatch.TRITON_INSTALLED)
    assert not kernels.use_fused(op, like("cuda", torch.float64))
    with kernels.backend("torch"):
        assert not kernels.use_fused(op, like("cuda"))
    with kernels.backend("triton"):
        assert kernels.use_fused(op, like("cpu")) and kernels.use_fused(op, like("cuda", torch.bfloat16))
        assert not kernels.use_fused(op, like("cpu", torch.float64))
    assert kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="auto, torch, triton"):
        kernels.set_backend("cuda")


def test_correlation_stays_on_the_reference_in_auto():
    """Until the kernel is measured faster on a GPU (benchmarks/RESULTS.md)."""
    assert not kernels.use_fused("masked_correlation_attention", like("cuda", torch.bfloat16))


# ---- the entry points reach each implementation ----------------------------------------------------------------------

def correlation_call():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(1, 20, 16, generator=g), dim=-1)
    return (kernels.masked_correlation_attention, correlation, "masked_correlation_attention_triton",
            (feats, torch.randint(-1, 3, (1, 20), generator=g), torch.randn(1, 20, 8, generator=g), 4.0))


def merging_call():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(2, 30, 16, generator=g), dim=-1)
    return kernels.merge_regions, merging, "merge_regions_triton", (feats, torch.randint(0, 5, (2, 30), generator=g),
                                                                   5, 0.2)


def stitch_call():
    g = torch.Generator().manual_seed(0)
    windows = sliding_windows(40, 56, 40, 40)
    args = (torch.randn(len(windows), 3, 5, 5, generator=g), windows, (40, 56), (30, 42), torch.tensor([0, 1, 1]),
            2, 40.0, 0.0, torch.randint(0, 4, (30, 42), generator=g), 4)
    return kernels.stitch_classify_vote, stitch_vote, "_stitch_classify_vote_geometry", args


def on(device, args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("call", [correlation_call, merging_call, stitch_call], ids=lambda f: f.__name__)
def test_entry_points(call, device, monkeypatch):
    """"torch" runs the reference, "triton" the Triton path, "auto" what AUTO says for the device."""
    entry, module, fused_name, args = call()
    args = on(device, args)
    fused, calls = getattr(module, fused_name), []
    monkeypatch.setattr(module, fused_name, lambda *a, **k: calls.append(1) or fused(*a, **k))
    with kernels.backend("torch"):
        ref = entry(*args)
    assert calls == []
    with kernels.backend("triton"):
        out = entry(*args)
    assert calls == [1]
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    entry(*args)
    op = {correlation: "masked_correlation_attention", merging: "merge_regions", stitch_vote: "stitch_classify_vote"}
    assert len(calls) == 1 + (device.type == "cuda" and dispatch.AUTO[op[module]])


def test_bundle_path_merging_reaches_the_kernel(device, monkeypatch):
    """window_regions (what every CorrCLIP path calls, bundles included) merges through the entry point."""
    calls = []
    fused = merging.merge_regions_triton
    monkeypatch.setattr(merging, "merge_regions_triton", lambda *a: calls.append(1) or fused(*a))
    masks = torch.randint(0, 4, (2, 32, 32)).to(device)
    feats = F.normalize(torch.randn(2, 16, 8), dim=-1).to(device)
    with kernels.backend("torch"):
        ref = window_regions(masks, feats, (4, 4), (2, 2))
    with kernels.backend("triton"):
        out = window_regions(masks, feats, (4, 4), (2, 2))
    assert calls == [1] and torch.equal(out.region_ids, ref.region_ids)


# ---- failures, devices, export, compile ------------------------------------------------------------------------------

def test_failure_falls_back_once(monkeypatch):
    _, module, fused_name, args = merging_call()

    def broken(*a):
        raise RuntimeError("PTXASError: ptxas fatal: no such architecture\nmore lines")

    monkeypatch.setattr(module, fused_name, broken)
    ref = merging.merge_regions(*args)
    try:
        with pytest.warns(RuntimeWarning, match="merge_regions failed .*PTXASError.* reference from now on"):
            out = torch.ops.corrclip.merge_regions(*args)
        assert torch.equal(out, ref)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            assert torch.equal(torch.ops.corrclip.merge_regions(*args), ref)
        assert not kernels.use_fused("merge_regions", like("cuda"))  # straight to the reference from now on
        with kernels.backend("triton"), pytest.raises(RuntimeError, match="ptxas"):  # tests see the error
            torch.ops.corrclip.merge_regions(*args)
    finally:
        dispatch.reset_failures()
    assert kernels.use_fused("merge_regions", like("cuda")) == dispatch.TRITON_INSTALLED

    def out_of_memory(*a):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(module, fused_name, out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # not a kernel fault: no fallback, nothing remembered
        torch.ops.corrclip.merge_regions(*args)
    assert kernels.use_fused("merge_regions", like("cuda")) == dispatch.TRITON_INSTALLED


def test_launches_on_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device: run_fused makes it the inputs' one (tensors on cuda:1)."""
    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(torch.device(dev))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    out = dispatch.run_fused("merge_regions", lambda x: (x, list(entered)), None, torch.device("cuda", 1), 5)
    assert out == (5, [torch.device("cuda", 1)])
    assert dispatch.run_fused("merge_regions", lambda x: x, None, torch.device("cpu"), 6) == 6
    assert entered == [torch.device("cuda", 1)]


class Attention(torch.nn.Module):
    def forward(self, feats, ids, values):
        return kernels.masked_correlation_attention(feats, ids, values, 4.0)


class AttentionOp(torch.nn.Module):
    def forward(self, feats, ids, values):
        return torch.ops.corrclip.masked_correlation_attention(feats, ids, values, 4.0)


def test_export_traces_the_reference():
    """Even with Triton forced, torch.export (and so ONNX and AOTInductor) records the plain torch ops; a graph that
    calls the custom op itself exports too (its fake implementation gives the shapes)."""
    _, _, _, (feats, ids, values, _) = correlation_call()
    with kernels.backend("triton"):
        graph = torch.export.export(Attention(), (feats, ids, values)).graph
        direct = torch.export.export(AttentionOp(), (feats, ids, values)).graph
    targets = {str(node.target) for node in graph.nodes}
    assert not any("corrclip" in t for t in targets) and any("softmax" in t for t in targets)
    assert "corrclip.masked_correlation_attention.default" in {str(node.target) for node in direct.nodes}


def test_torch_compile_sees_the_custom_op(device):
    feats, ids, values, _ = on(device, correlation_call()[3])
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(Attention(), backend=record, fullgraph=True)
    with kernels.backend("triton"):
        out = compiled(feats, ids, values)
    torch._dynamo.reset()
    assert len(graphs) == 1 and "corrclip.masked_correlation_attention" in graphs[0]
    torch.testing.assert_close(out, correlation.masked_correlation_attention(feats, ids, values), rtol=1e-5, atol=1e-6)


def test_custom_ops_pass_opcheck(device):
    """Schemas, fake implementations against the real ones, and the traced (aot_dispatch) path of every op."""
    from corrclip.kernels import sam_post

    corr, merge, stitch = (on(device, call()[3]) for call in (correlation_call, merging_call, stitch_call))
    geometry = stitch_vote.window_geometry(stitch[1], device)
    low = torch.randn(3, 16, 16).to(device)
    sizes, scales, blocks = [12, 20, 8, 16], [8 / 12, 16 / 20, 16 / 64], [16, 16, 2]
    cases = [
        (torch.ops.corrclip.masked_correlation_attention, corr),
        (torch.ops.corrclip.merge_regions, merge),
        (torch.ops.corrclip.stitch_classify_vote, (stitch[0], geometry, [40, 56], [30, 42], *stitch[4:])),
        (sam_post.sam_mask_stats, (low, torch.tensor([0, 2], device=device), sizes, scales, [0.0, 1.0, -1.0],
                                   blocks)),
        (sam_post.sam_paint, (low, torch.tensor([2, 0], device=device),
                              torch.tensor([[0, 0, 19, 11]] * 2, dtype=torch.int32, device=device), sizes, scales,
                              0.0, blocks)),
    ]
    with kernels.backend("triton"):
        for op, args in cases:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
