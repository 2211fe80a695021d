"""Precision modes, declared once: which stages run their matrix work in half precision, on what hardware.

    fp32  the exact reference path, bit for bit (every stage fp32, reference attention).
    fp16  the encoders' weights and activations in float16, fused attention; every decision in fp32.
    bf16  the same in bfloat16 (8 mantissa bits against fp16's 11: measure before trusting it).
    auto  the fastest mix that stays within the fidelity budget on the hardware at hand (`resolve`).

The encoders are the heavy matrix work (ENCODERS). The decisions always run in fp32 on fp32 inputs:
region merging (the 0.2 distance cut), the correlation head (the scope rule compares S with its mean,
softmax), SAM's prompt decoder and mask filters (IoU, stability, NMS), stitching, classification and
the vote. DINO's q+k features are normalized in fp32 whatever its precision. The fidelity budget is
the research code's own rounding (it runs CLIP and DINO in fp16): benchmarks/fidelity.py measures
both against our fp32 reference on the same inputs (benchmarks/RESULTS.md, "Fidelity budget").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MODES = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Stages whose weights and activations may run in half precision (their outputs return as fp32).
ENCODERS = ("sam_encoder", "dino", "clip_trunk", "clip_text", "clip_dense")
# Stages `auto` lowers to fp16 (CUDA): measured within the budget (benchmarks/RESULTS.md, "Fidelity budget").
# SC-CLIP's and CLIPtrase's dense CLIP ("clip_dense") makes decisions inside the graph (outlier tokens,
# clustering), so it is lowered only when asked for explicitly.
AUTO_STAGES = ("sam_encoder", "dino", "clip_trunk", "clip_text")
# ... and to bf16 (CPUs with bf16 units). DINO, the CLIP trunk and the text tower each went over the budget
# in bf16 (8 mantissa bits: 8x fp16's per-stage error), so they stay fp32; SAM's encoder feeds thresholded
# mask logits, not the class decisions.
AUTO_BF16_STAGES = ("sam_encoder",)


class PrecisionError(ValueError):
    """An unknown mode, or one the device cannot run; the message says what to do."""


@dataclass(frozen=True)
class Hardware:
    """What the device offers for half precision, detected once."""

    device: str  # "cpu" or "cuda"
    name: str  # CPU model or GPU name
    bf16: bool  # fast bf16 matrix units (AMX / AVX512-BF16 on a CPU; tensor cores on sm_80+)
    fp16: bool  # fast fp16 matrix units (tensor cores; CPUs: see _cpu below)
    flags: tuple[str, ...] = ()  # the CPU flags that decided it


@dataclass(frozen=True)
class Plan:
    """The resolved choice: a dtype name per encoder stage, fused attention or not, and why."""

    requested: str
    stages: dict[str, str] = field(default_factory=dict)  # encoder stage -> "fp32" | "bf16" | "fp16"
    fused_attention: bool = False  # SDPA forms of attention that the reference computes explicitly (SAM)
    reason: str = ""
    hardware: Hardware | None = None

    @property
    def exact(self) -> bool:
        """True for the bit-exact reference path."""
        return not self.fused_attention and all(v == "fp32" for v in self.stages.values())

    def name(self, stage: str) -> str:
        return self.stages.get(stage, "fp32")

    def dtype(self, stage: str) -> torch.dtype:
        return DTYPES[self.name(stage)]

    def summary(self) -> str:
        """One line: "bf16 (sam_encoder, dino, ...) + fused attention" or "fp32 (exact)"."""
        half = sorted({v for v in self.stages.values() if v != "fp32"})
        if self.exact:
            return "fp32 (exact reference)"
        lowered = [k for k, v in self.stages.items() if v != "fp32"]
        text = f"{'/'.join(half)} for {', '.join(lowered)}" if half else "fp32"
        return text + (" + fused attention" if self.fused_attention else "")

    def describe(self) -> dict:
        """What ran, stage by stage, for JSON summaries and bench reports."""
        hw = self.hardware
        return {"requested": self.requested, "resolved": self.summary(), "exact": self.exact,
                "stages": {s: self.name(s) for s in ENCODERS}, "fused_attention": self.fused_attention,
                "decisions": "fp32", "reason": self.reason,
                "hardware": None if hw is None else {"device": hw.device, "name": hw.name, "bf16_units": hw.bf16,
                                                     "fp16_units": hw.fp16, "flags": list(hw.flags)}}


@functools.cache
def _cpu() -> Hardware:
    flags: set[str] = set()
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
    except OSError:  # not Linux: assume no half-precision units (auto then stays fp32, never slower)
        pass
    bf16_flags = tuple(sorted(flags & {"amx_bf16", "avx512_bf16"}))
    # oneDNN runs fp16 matrix work at speed only with AMX-FP16 (Granite Rapids); AVX512-FP16 alone
    # is slower than bf16 on AMX, so fp16 is never auto's pick on a CPU.
    fp16_flags = tuple(sorted(flags & {"amx_fp16"}))
    return Hardware("cpu", name, bool(bf16_flags), bool(fp16_flags), bf16_flags + fp16_flags)


def detect(device: torch.device | str) -> Hardware:
    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        # tensor cores: fp16 from Volta (sm_70), bf16 from Ampere (sm_80)
        return Hardware("cuda", torch.cuda.get_device_name(device), major >= 8, major >= 7)
    return _cpu()


def resolve(mode: str | None, device: torch.device | str, hardware: Hardware | None = None) -> Plan:
    """The Plan a mode means on this device. fp32 is the exact reference wherever it runs."""
    mode = mode or "fp32"
    if mode not in MODES:
        raise PrecisionError(f"unknown precision {mode!r}; choose one of {', '.join(MODES)}")
    hw = hardware or detect(device)
    if mode == "fp32":
        return Plan("fp32", {s: "fp32" for s in ENCODERS}, False, "asked for the exact reference", hw)
    if mode in ("bf16", "fp16"):
        fast = hw.bf16 if mode == "bf16" else hw.fp16
        note = "" if fast else f" (no {mode} matrix units on {hw.name}: emulated, slower than fp32)"
        return Plan(mode, {s: mode for s in ENCODERS}, True, f"asked for {mode}{note}", hw)
    # auto
    if hw.device == "cuda" and hw.fp16:
        # the research code's own precision for CLIP and DINO; fp16 keeps 3 more mantissa bits than bf16
        return Plan("auto", {s: ("fp16" if s in AUTO_STAGES else "fp32") for s in ENCODERS}, True,
                    f"fp16 tensor cores on {hw.name}", hw)
    if hw.bf16:
        return Plan("auto", {s: ("bf16" if s in AUTO_BF16_STAGES else "fp32") for s in ENCODERS}, True,
                    f"bf16 matrix units ({', '.join(hw.flags)}) on {hw.name}: bf16 for SAM's encoder only (DINO "
                    "and CLIP in bf16 exceed the fidelity budget)", hw)
    return Plan("auto", {s: "fp32" for s in ENCODERS}, True,
                f"no half-precision matrix units on {hw.name}: fp32 with fused attention", hw)


def bundle_plan(mode: str | None, graph_precision: dict[str, str], device: torch.device | str,
                backend: str, native: Callable[[str], bool] | None = None) -> Plan:
    """The Plan for an engine bundle. Its graphs run at the precision they were exported in
    (`graph_precision`: graph name -> "fp32" | "bf16" | "fp16"), except on a backend that picks the inference
    precision of fp32 graphs at load time (OpenVINO): `native` says which precisions it runs natively on this
    device (OpenVINO's CPU OPTIMIZATION_CAPABILITIES). There `auto` lowers SAM's encoder graph
    (AUTO_BF16_STAGES) to bf16 where the CPU has it, bf16/fp16 lower every encoder graph where the CPU
    has that precision, and anything the CPU lacks falls back to fp32 (emulated half precision would be
    slower), saying so in the reason. The
    decision graphs (correlation head, SAM prompts) stay fp32 throughout."""
    mode = mode or "fp32"
    if mode not in MODES:
        raise PrecisionError(f"unknown precision {mode!r}; choose one of {', '.join(MODES)}")
    hw = detect(device)
    stages = {s: graph_precision.get(s, "fp32") for s in ENCODERS}
    exported = sorted({v for v in graph_precision.values() if v != "fp32"}) or ["fp32"]
    if native is not None and exported == ["fp32"]:
        asked = "bf16" if mode == "auto" else mode
        want = asked if asked == "fp32" or native(asked) else "fp32"
        lowered = AUTO_BF16_STAGES if mode == "auto" else ENCODERS
        stages = {s: (want if s in lowered else "fp32") for s in ENCODERS}
        why = f"{backend} inference precision {want}"
        if want != asked:
            why += f": {backend} lists no native {asked} on {hw.name}, so fp32 (emulated {asked} would be slower)"
        elif want != "fp32":
            why += f" ({backend} runs {want} natively on {hw.name}; decision graphs fp32)"
        return Plan(mode, stages, False, why, hw)
    if mode not in ("auto", *exported):
        have = "/".join(exported)
        raise PrecisionError(f"this bundle's graphs were exported at {have}, not {mode}: re-export with "
                             f"corrclip-export --precision {mode}, or run it with --precision {have} (or auto)")
    return Plan(mode, stages, False, f"the bundle's export precision ({'/'.join(exported)})", hw)


def export_plan(mode: str | None, device: torch.device | str) -> Plan:
    """The precision each graph of a bundle is exported at. bf16/fp16 lower the encoder graphs (ENCODERS);
    the decision graphs (correlation head, SAM's prompt graphs) always stay fp32. `auto` picks what the
    target would run: fp16 for a CUDA target with tensor cores (the research code's own precision for CLIP
    and DINO), fp32 for a CPU target. A CPU with bf16 units runs such a bundle in bf16 through OpenVINO,
    which lowers fp32 graphs at load time (bundle_plan); a bf16 ONNX graph would help no CPU runtime here:
    ONNX Runtime's CPU provider lacks bf16 kernels for most operators, so its parity could not be checked."""
    mode = mode or "fp32"
    if mode not in MODES:
        raise PrecisionError(f"unknown precision {mode!r}; choose one of {', '.join(MODES)}")
    hw = detect(device)
    if mode in ("bf16", "fp16"):
        return Plan(mode, {s: mode for s in ENCODERS}, False, f"asked for {mode} encoder graphs", hw)
    if mode == "auto" and hw.device == "cuda" and hw.fp16:
        return Plan("auto", {s: ("fp16" if s in AUTO_STAGES else "fp32") for s in ENCODERS}, False,
                    f"fp16 encoder graphs for the tensor cores of {hw.name}", hw)
    why = "asked for the exact reference" if mode == "fp32" else (
        f"fp32 graphs for a CPU target ({hw.name}): OpenVINO lowers them to bf16 at load time where the CPU "
        "has bf16 units")
    return Plan(mode, {s: "fp32" for s in ENCODERS}, False, why, hw)

