r"""Ahead-of-time compilation of every Triton kernel for a CUDA target, without a GPU.

Each op's Triton path runs on CPU example tensors at real sizes with launches recorded, not run
(triton_common.recording), so what is compiled is exactly what the GPU dispatch launches: the same kernels, block
sizes, warps, stages, argument types and alignment specializations. Each launch is then compiled by Triton for an
explicit target (GPUTarget("cuda", 90, 32) is an H100/H200) with its bundled ptxas, and ptxas's report is checked
against the chip's limits: no register spills and no stack frame, at most 255 registers a thread, shared memory
within the per-block maximum. Half-precision products must compile to tensor-core instructions.

    python -m corrclip.kernels.aot                       # sm_90 and sm_80, a table; exit 1 if a limit is broken
    python -m corrclip.kernels.aot --arch 90 --json aot.json

Run it where Triton compiles (TRITON_INTERPRET unset): it never touches a GPU, CUDA driver or not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import triton_common


@dataclass(frozen=True)
class Chip:
    name: str
    smem_per_block: int  # bytes, the opt-in maximum for one block
    smem_per_sm: int
    regs_per_sm: int = 65536
    regs_per_thread: int = 255


CHIPS = {90: Chip("H100/H200 (sm_90)", 227 * 1024, 228 * 1024), 80: Chip("A100 (sm_80)", 163 * 1024, 164 * 1024)}


@dataclass
class Report:
    op: str
    kernel: str
    arch: int
    dtype: str  # of the first floating-point tensor argument (what the products run in)
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    threads: int
    tensor_cores: str  # the matrix instructions in the PTX: "wgmma", "mma", or "" (CUDA cores)
    blocks_per_sm: int
    problems: list[str]


def example_launches() -> list[tuple[str, triton_common.Launch]]:
    """(op, launch) for every kernel launch of every Triton path at real sizes, half precision and fp32."""
    from ..runtime.preprocess import resized_size, sliding_windows
    from . import correlation, merging, sam_post, stitch_vote

    g = torch.Generator().manual_seed(0)
    out: list[tuple[str, triton_common.Launch]] = []
    with triton_common.recording() as launches:
        # CorrCLIP at 336 windows: 42 x 42 DINO grid, C = 768, D = 2 x 768 (the head's channel-strided view)
        for dtype in (torch.float32, torch.bfloat16):
            feats = F.normalize(torch.randn(1, 1764, 768, generator=g), dim=-1).to(dtype)
            ids = torch.randint(-1, 30, (1, 1764), generator=g)
            values = torch.randn(1, 1536, 1764, generator=g).to(dtype).transpose(1, 2)
            correlation.masked_correlation_attention_triton(feats, ids, values)
            out += [("masked_correlation_attention", x) for x in launches[len(out):]]
            merging.merge_regions_triton(feats, torch.randint(0, 200, (1, 1764), generator=g), 200)
            out += [("merge_regions", x) for x in launches[len(out):]]
        # Cityscapes: 2048 x 1024 resized to short side 448, windows of 224, 171 queries, 200 regions
        h, w = resized_size(1024, 2048, 448)
        windows = sliding_windows(h, w, 224, 112)
        logits = torch.randn(len(windows), 171, 28, 28, generator=g)
        stitch_vote.stitch_classify_vote_triton(logits, windows, (h, w), (1024, 2048), torch.arange(171), 171, 40.0,
                                                0.0, torch.randint(0, 200, (1024, 2048), generator=g), 200)
        out += [("stitch_classify_vote", x) for x in launches[len(out):]]
        # SAM: decoder outputs of 4 prompts for the same image; every candidate passes the IoU filter
        sam_post.sam_postprocess_triton(torch.randn(4, 3, 256, 256, generator=g), torch.ones(4, 3), (512, 1024),
                                        (1024, 2048), 0.7, 0.7, 1.0, 0.0, 0.7)
        out += [("sam_postprocess", x) for x in launches[len(out):]]
    return out


def _describe(launch: triton_common.Launch) -> str:
    return ", ".join(f"{k}={v}" for k, v in launch.kwargs.items())


def compile_launch(launch: triton_common.Launch, arch: int):
    """Triton's own compile path for `launch` on an explicit target: (compiled kernel, ptxas log)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by Triton
        knobs.compilation.always_compile = True  # a cached kernel would come back without a report
        compiled = compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled, log.getvalue()


def _number(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else 0


def check(op: str, launch: triton_common.Launch, arch: int) -> Report:
    compiled, log = compile_launch(launch, arch)
    chip = CHIPS[arch]
    regs = _number(r"Used (\d+) registers", log)
    stores, loads = _number(r"(\d+) bytes spill stores", log), _number(r"(\d+) bytes spill loads", log)
    stack = _number(r"(\d+) bytes stack frame", log)
    shared = compiled.metadata.shared
    threads = 32 * compiled.metadata.num_warps
    ptx = compiled.asm["ptx"]
    cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else ""
    allocated = -(-regs // 8) * 8 * threads  # registers are allocated 8 a thread at a time (approximately)
    blocks = min(chip.regs_per_sm // max(allocated, 1), chip.smem_per_sm // max(shared, 1), 2048 // threads, 32)
    problems = []
    if not log.strip() or "Used" not in log:
        problems.append("no ptxas report")
    if stores or loads or stack:
        problems.append(f"spills: {stores} B stored, {loads} B loaded, {stack} B stack frame")
    if regs > chip.regs_per_thread:
        problems.append(f"{regs} registers > {chip.regs_per_thread}")
    if shared > chip.smem_per_block:
        problems.append(f"{shared} B shared memory > {chip.smem_per_block} B a block")
    if blocks < 1:
        problems.append("does not fit one block on an SM")
    dtype = next((a.dtype for a in launch.args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
    if dtype in (torch.float16, torch.bfloat16) and "tl.dot" in launch.kernel.src and not cores:
        problems.append("half-precision tl.dot without tensor-core instructions")
    return Report(op, launch.kernel.__name__, arch, str(dtype).removeprefix("torch."), _describe(launch), regs, stores,
                  loads, stack, shared, threads, cores, blocks, problems)


def unique_launches() -> list[tuple[str, triton_common.Launch]]:
    """One launch per distinct (kernel, argument types, constexprs, options)."""
    seen, out = set(), []
    for op, launch in example_launches():
        types = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in launch.args)
        key = (launch.kernel.__name__, types, _describe(launch))
        if key not in seen:
            seen.add(key)
            out.append((op, launch))
    return out


def markdown(reports: list[Report]) -> str:
    lines = ["| op | kernel | arch | dtype | config | regs | spills (st/ld B) | smem B | threads | matrix | blocks/SM "
             "| ok |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.op} | {r.kernel} | sm_{r.arch} | {r.dtype} | {r.config} | {r.registers} | {r.spill_stores}/"
                     f"{r.spill_loads} | {r.shared} | {r.threads} | {r.tensor_cores or '-'} | {r.blocks_per_sm} | "
                     f"{'; '.join(r.problems) or 'yes'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m corrclip.kernels.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(CHIPS),
                        help="compute capabilities to compile for (default: 90 80)")
    parser.add_argument("--json", help="also write the reports here")
    args = parser.parse_args(argv)
    from triton import knobs

    if knobs.runtime.interpret:
        parser.error("TRITON_INTERPRET is set: unset it, the interpreter compiles nothing")
    launches = unique_launches()
    reports = [check(op, launch, arch) for arch in args.arch for op, launch in launches]
    print(markdown(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    bad = [r for r in reports if r.problems]
    for r in bad:
        print(f"FAILED {r.kernel} sm_{r.arch}: {'; '.join(r.problems)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
