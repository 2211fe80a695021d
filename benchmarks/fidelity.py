r"""The fidelity budget, measured: every path's labels against our fp32 reference on the same inputs.

    python benchmarks/fidelity.py --backbone vit_b --weights random --images voc,square --masks synthetic \
        --name cpu_vit_b

Paths: our fp32 reference (Segmenter, precision fp32); the research-style path (benchmarks/research_style.py)
at fp32 and at its own half precision (CLIP and DINO weights and activations in fp16 where the device runs
fp16, else bf16); our fast paths (precision bf16, fp16, auto); and bf16 with one stage lowered at a time
("bf16:dino" ...), to find which stage's lowering moves labels. Per path, against the fp32 reference:
share of final labels that differ, share of labels that differ before the vote (argmax of the class
probabilities, prob_thd applied), max |delta prob|, and per stage the max relative error
(max |out - ref| / max |ref|) of the stage run on identical inputs (a stage whose inputs differ from the
reference's, because an earlier decision moved, is run again on the reference's inputs). The research
paths' stages are compared with the research fp32 path's the same way.

The budget is the research path's own rounding: its half-precision run against its fp32 run. A fast path is
within budget when it moves no more labels than that, before and after the vote.

Masks: --masks synthetic gives every path the same Voronoi label maps of many regions (harness.py);
--masks sam lets each path run its own SAM (random-weight SAM finds ~no masks: the report says how many).
Stage outputs are memoized by (stage, precision, input bytes): a path that lowers one stage reuses the
outputs other paths computed for identical inputs, bit for bit (the same module on the same tensors).
The research paths' text tower runs open_clip's encode_text on the context trimmed after the longest
prompt (exact: the tower is causal and pools at end-of-text), to fit a CPU budget.
With random weights the logit margins are tiny, so label agreement is pessimistic against trained weights.
Writes benchmarks/results/fidelity_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from harness import synthetic_image, synthetic_label_map
from research_style import ResearchStylePath, half_precision

from corrclip import methods
from corrclip import precision as precision_modes
from corrclip.api import Segmenter, as_vocabulary
from corrclip.models.build import build_models
from corrclip.precision import Plan
from corrclip.runtime.amg import AmgSettings

RESULTS = Path(__file__).resolve().parent / "results"
IMAGES = {"voc": (375, 500), "square": (300, 300), "tall": (500, 375), "wide": (240, 640), "tiny": (96, 128)}
# 8 queries (background with synonyms): the text tower runs 80 prompts per query at every precision.
CLASSES = "background; wall; sky, person, car, tree, dog, road"
STAGE_NAMES = ("sam_encoder", "dino", "clip_trunk", "clip_text")


# ---- measurements ---------------------------------------------------------------------------------------------------


def _floats(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _floats(v)]
    return []


def rel_error(ref, out) -> float:
    """max |out - ref| / max |ref| over the floating tensors of two outputs (nested tuples allowed)."""
    worst = 0.0
    for a, b in zip(_floats(ref), _floats(out), strict=True):
        a, b = a.float(), b.float()
        if a.shape != b.shape:
            return float("inf")
        scale = float(a.abs().max()) if a.numel() else 0.0
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def same_inputs(a: Sequence, b: Sequence) -> bool:
    def eq(x, y) -> bool:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y
    return eq(tuple(a), tuple(b))


def prevote_labels(probs: np.ndarray, prob_thd: float) -> np.ndarray:
    """[C, H, W] class probabilities -> labels before the vote: argmax, 0 where the best is under prob_thd."""
    labels = probs.argmax(0)
    labels[probs.max(0) < prob_thd] = 0
    return labels


@dataclasses.dataclass
class Record:
    """What one path produced on the inputs: per image labels and probabilities, per stage (inputs, output)."""

    labels: list[np.ndarray]
    probs: list[np.ndarray]
    calls: dict[str, list[tuple[tuple, object]]]
    text: torch.Tensor
    rerun: dict[str, Callable] = dataclasses.field(default_factory=dict)  # stage -> run it on other inputs
    regions: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def agreement(ref: Record, run: Record, prob_thd: float) -> dict:
    """Shares of pixels whose final / pre-vote label differs from the reference's, and max |delta prob|."""
    final = prevote = pixels = 0
    dprob = 0.0
    for la, lb, pa, pb in zip(ref.labels, run.labels, ref.probs, run.probs, strict=True):
        final += int((la != lb).sum())
        prevote += int((prevote_labels(pa, prob_thd) != prevote_labels(pb, prob_thd)).sum())
        dprob = max(dprob, float(np.abs(pa.astype(np.float64) - pb).max()))
        pixels += la.size
    return {"final_diff": final / pixels, "prevote_diff": prevote / pixels, "max_dprob": dprob}


def stage_errors(ref: Record, run: Record) -> dict[str, float]:
    """Per stage, max relative error of `run`'s stage against `ref`'s on identical inputs."""
    out = {"clip_text": rel_error(ref.text, run.text)}
    for stage, calls in ref.calls.items():
        mine = run.calls.get(stage, [])
        worst = 0.0
        for k, (args, ref_out) in enumerate(calls):
            if k < len(mine) and same_inputs(args, mine[k][0]):
                got = mine[k][1]
            else:  # an earlier decision moved this stage's inputs: run it on the reference's
                got = run.rerun[stage](*args)
            worst = max(worst, rel_error(ref_out, got))
        out[stage] = worst
    return out


# ---- our paths ------------------------------------------------------------------------------------------------------


def _digest(args) -> str:
    h = hashlib.sha1()
    for t in args:
        if isinstance(t, torch.Tensor):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(t).encode())
    return h.hexdigest()


class Memo:
    """A stage module, its outputs memoized by (stage, precision, input bytes) across paths; logs its calls."""

    cache: dict[tuple, object] = {}

    def __init__(self, module: Callable, key: tuple):
        self.module, self.key = module, key
        self.calls: list[tuple[tuple, object]] = []

    def run(self, *args):
        k = (*self.key, _digest(args))
        if k not in Memo.cache:
            with torch.inference_mode():
                Memo.cache[k] = self.module(*args)
        return Memo.cache[k]

    def __call__(self, *args):
        out = self.run(*args)
        self.calls.append((tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), out))
        return out


def plan_for(mode: str, device: torch.device, fused_ok: bool) -> Plan:
    """A mode's Plan, or "bf16:<stage>": bf16 for that stage only. Fused SAM attention off where its module
    is absent (its fidelity is measured by its own tests)."""
    if ":" in mode:
        dtype, stage = mode.split(":")
        base = precision_modes.resolve("fp32", device)
        plan = Plan(mode, {s: (dtype if s == stage else "fp32") for s in precision_modes.ENCODERS}, False,
                    f"only {stage} in {dtype}", base.hardware)
    else:
        plan = precision_modes.resolve(mode, device)
    return plan if fused_ok else dataclasses.replace(plan, fused_attention=False)


def build_segmenter(args, plan: Plan, device: torch.device, text_cache: Path) -> Segmenter:
    """A Segmenter running `plan`, its stage modules behind Memo."""
    sam = None if args.masks == "sam" else "none"
    seg = Segmenter(args.backbone, args.weights, device=device, sam=sam, plan=plan, text_cache=text_cache,
                    amg=AmgSettings(points_per_side=args.points))
    enc = seg.pipeline.method
    for attr, stage in (("dino", "dino"), ("trunk", "clip_trunk")):
        memo = Memo(getattr(enc, attr), (stage, plan.name(stage)))
        setattr(enc, attr, memo)
        enc.stages[stage] = memo
    gen = seg.pipeline.mask_generator
    if gen is not None:
        gen.encoder = Memo(gen.encoder, ("sam_encoder", plan.name("sam_encoder"), plan.fused_attention))
    return seg


def run_segmenter(seg: Segmenter, images, label_maps, vocab, settings) -> Record:
    seg.text_embeddings(vocab)  # text first, outside the timed images (the disk cache shares it)
    t0 = time.perf_counter()
    out = seg.run(images, vocab, settings, label_maps, return_probs=True)
    seconds = time.perf_counter() - t0
    enc, gen = seg.pipeline.method, seg.pipeline.mask_generator
    memos = {"dino": enc.dino, "clip_trunk": enc.trunk}
    if gen is not None:
        memos["sam_encoder"] = gen.encoder
    return Record([o.labels for o in out], [o.probs.astype(np.float32) for o in out],
                  {k: m.calls for k, m in memos.items()}, seg.text_embeddings(vocab).float().cpu(),
                  {k: m.run for k, m in memos.items()}, seconds=seconds)


# ---- research paths -------------------------------------------------------------------------------------------------


def short_encode_text(clip: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text on the context trimmed after the longest prompt: the tower is causal and
    pools at end-of-text, so this changes no number's meaning, only the work."""
    n = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :n]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:n].to(cast)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return x @ clip.text_projection


def build_research(args, precision: str, device: torch.device) -> ResearchStylePath:
    sam = None if args.masks == "sam" else "none"
    path = ResearchStylePath(build_models(args.backbone, args.weights, sam=sam, device=device), device, args.points,
                             precision=precision, keep_probs=True)
    path.clip.encode_text = lambda tokens: short_encode_text(path.clip, tokens)
    return path


def run_research(path: ResearchStylePath, images, label_maps, vocab, settings) -> Record:
    calls: dict[str, list] = {"dino": [], "clip_trunk": []}
    plain = {"dino": path._dino_features, "clip_trunk": path._clip}

    def logged(stage: str):
        def call(*a):
            out = plain[stage](*a)
            calls[stage].append((a, out[:2] if stage == "clip_trunk" else out))  # values, MCTs (not the ids)
            return out
        return call

    path._dino_features, path._clip = logged("dino"), logged("clip_trunk")
    text = path.text(vocab).float().cpu()
    labels, probs, regions = [], [], []
    t0 = time.perf_counter()
    for i, img in enumerate(images):
        out, _ = path.segment(img, vocab, settings, None if label_maps is None else label_maps[i])
        labels.append(out)
        probs.append(path.last_probs.float().cpu().numpy())
        regions.append(path.last_regions)
    seconds = time.perf_counter() - t0

    def rerun(stage: str):
        def call(*a):
            with torch.inference_mode():
                out = plain[stage](*a)
            return out[:2] if stage == "clip_trunk" else out
        return call

    return Record(labels, probs, calls, text, {s: rerun(s) for s in plain}, regions, seconds)


# ---- report ---------------------------------------------------------------------------------------------------------


def machine() -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        info["cpu_flags"] = flags
        info["half_flags"] = sorted(f for f in flags if "avx512" in f or "amx" in f or f in ("f16c", "avx2", "fma"))
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = precision_modes.detect("cpu").name
    return info


def verdicts(report: dict) -> list[str]:
    rows = report["paths"]
    budget = report.get("budget")
    if budget is None:
        return ["no research half-precision run: no budget to compare with"]
    lines = []
    for name, r in rows.items():
        if name.startswith("research") or name == "fp32" or "error" in r:
            continue
        a = r["vs_fp32"]
        ok = a["final_diff"] <= budget["final_diff"] and a["prevote_diff"] <= budget["prevote_diff"]
        lines.append(f"{name}: {'within' if ok else 'OVER'} budget (final {100 * a['final_diff']:.3f}% vs "
                     f"{100 * budget['final_diff']:.3f}%, before vote {100 * a['prevote_diff']:.3f}% vs "
                     f"{100 * budget['prevote_diff']:.3f}%; max abs dprob {a['max_dprob']:.2e} = "
                     f"{a['max_dprob'] / max(budget['max_dprob'], 1e-12):.1f}x the budget's)")
    return lines


def markdown(report: dict) -> str:
    a, m = report["args"], report["machine"]
    stages = [s for s in STAGE_NAMES if any(s in r.get("stage_rel_error", {}) for r in report["paths"].values())]
    lines = [f"# Fidelity budget: {report['name']}", "",
             f"{report['date']}, backbone **{a['backbone']}** ({a['weights']} weights), {a['device']}, CPU "
             f"{m.get('cpu', '?')} (flags: {', '.join(m.get('half_flags', [])) or 'none'}), {m['threads']} threads, "
             f"torch {m['torch']}.",
             f"Images: {report['images']}; masks: {report['masks']}; classes: `{a['classes']}`.",
             f"Research-style half precision: **{report['research_precision']}**.", "",
             "Label shares are of all pixels of all images, against our fp32 reference (Segmenter precision fp32); "
             "stage errors are max |out - ref| / max |ref| on identical inputs (research paths: against the research "
             "fp32 path). Budget = research half vs research fp32. run s: this path's wall seconds here, build and "
             "text included, stage outputs shared with earlier paths where inputs match: not a speed figure.", "",
             "| path | plan | final labels differ | before vote differ | max abs dprob | "
             + " | ".join(f"{s} rel err" for s in stages) + " | run s |",
             "|" + "---|" * (6 + len(stages))]
    for name, r in report["paths"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:100]} |" + " |" * (4 + len(stages)))
            continue
        v = r["vs_fp32"]
        errs = " | ".join(f"{r['stage_rel_error'][s]:.2e}" if s in r["stage_rel_error"] else "-" for s in stages)
        lines.append(f"| {name} | {r['plan']} | {100 * v['final_diff']:.3f}% | {100 * v['prevote_diff']:.3f}% | "
                     f"{v['max_dprob']:.2e} | {errs} | {r['seconds']:.0f} |")
    if report.get("budget"):
        b = report["budget"]
        lines += ["", f"**Budget** (research {report['research_precision']} vs research fp32): final "
                      f"{100 * b['final_diff']:.3f}%, before vote {100 * b['prevote_diff']:.3f}%, max abs dprob "
                      f"{b['max_dprob']:.2e}."]
    lines += ["", "**Verdict** (a fast path moves no more labels than the research path's own rounding):", ""]
    lines += [f"- {v}" for v in report["verdicts"]]
    lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


# ---- entry ----------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vit_b")
    p.add_argument("--weights", default="random", help="random (no download) or official")
    p.add_argument("--images", default="voc,square", help=f"comma list of {', '.join(IMAGES)} (one image each)")
    p.add_argument("--masks", default="synthetic", choices=("synthetic", "sam"))
    p.add_argument("--regions", type=int, default=60, help="cells of the synthetic label maps")
    p.add_argument("--points", type=int, default=8, help="SAM points per side with --masks sam")
    p.add_argument("--classes", default=CLASSES)
    p.add_argument("--preset", default="voc21", help="settings preset (prob_thd, windows)")
    p.add_argument("--paths", default="fp32,research:fp32,research:half,bf16,fp16,auto,bf16:dino,bf16:clip_trunk,"
                                      "bf16:clip_text",
                   help="fp32 (reference, always run first), research:<fp32|fp16|bf16|half>, a precision mode, or "
                        "bf16:<stage> (only that stage lowered)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", default=None, help="output stem (default <device>_<backbone>)")
    p.add_argument("--out", default=str(RESULTS))
    return p


def measure(args) -> dict:
    """Runs every path on the same inputs and returns the report (without writing it)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vocab = as_vocabulary(args.classes)
    settings = methods.get("corrclip").settings(args.preset)
    names = [n.strip() for n in args.images.split(",") if n.strip()]
    images = [synthetic_image(*IMAGES[n], seed) for seed, n in enumerate(names)]
    label_maps = None
    if args.masks == "synthetic":
        label_maps = [synthetic_label_map(*IMAGES[n], args.regions, seed) for seed, n in enumerate(names)]
    try:
        import corrclip.models.sam_attention  # noqa: F401
        fused_ok = True
    except ImportError:
        fused_ok = False
    notes = ["random weights: logit margins are tiny, so label agreement is pessimistic against trained weights"
             if args.weights == "random" else "official weights"]
    if not fused_ok and args.masks == "sam":
        notes.append("fused SAM attention not available in this tree: SAM runs reference attention on every path")
    research_precision = half_precision(device)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    paths = ["fp32", *[p for p in paths if p != "fp32"]]
    text_cache = Path(tempfile.mkdtemp(prefix="fidelity_text_"))
    rows: dict[str, dict] = {}
    records: dict[str, Record] = {}
    Memo.cache.clear()
    for name in paths:
        print(f"  {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            if name.startswith("research:"):
                prec = name.split(":", 1)[1]
                prec = research_precision if prec == "half" else prec
                name = f"research:{prec}"
                path = build_research(args, prec, device)
                rec = run_research(path, images, label_maps, vocab, settings)
                path.close()
                plan_text = f"CLIP+DINO {prec}" if prec != "fp32" else "fp32"
            else:
                plan = plan_for(name, device, fused_ok)
                seg = build_segmenter(args, plan, device, text_cache)
                rec = run_segmenter(seg, images, label_maps, vocab, settings)
                plan_text = plan.summary()
                del seg
        except Exception as e:  # noqa: BLE001 - a path that cannot run here is reported, the others measured
            if name == "fp32":
                raise  # no reference, nothing to measure
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"    error: {rows[name]['error']}", flush=True)
            continue
        finally:
            gc.collect()
        records[name] = rec
        ref = records["fp32"]
        row = {"plan": plan_text, "vs_fp32": agreement(ref, rec, settings.prob_thd),
               "seconds": round(time.perf_counter() - t0, 1), "images_seconds": round(rec.seconds, 1)}
        if name.startswith("research:") and "research:fp32" in records:
            row["stage_rel_error"] = stage_errors(records["research:fp32"], rec)
            row["vs_research_fp32"] = agreement(records["research:fp32"], rec, settings.prob_thd)
        elif not name.startswith("research:"):
            row["stage_rel_error"] = stage_errors(ref, rec)
        if rec.regions:
            row["regions_per_image"] = rec.regions
        rows[name] = row
        print(f"    {json.dumps(row)}", flush=True)
    budget = next((r["vs_research_fp32"] for n, r in rows.items()
                   if n.startswith("research:") and n != "research:fp32" and "vs_research_fp32" in r), None)
    report = {"name": args.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python benchmarks/fidelity.py " + " ".join(sys.argv[1:]), "args": vars(args),
              "machine": machine(), "images": ", ".join(f"{n} {IMAGES[n][1]}x{IMAGES[n][0]}" for n in names),
              "masks": f"synthetic ({args.regions} cells)" if label_maps is not None else f"SAM {args.points}x"
                       f"{args.points} points per path",
              "research_precision": research_precision, "paths": rows, "budget": budget, "notes": notes}
    if args.masks == "sam":
        counts = {n: r.get("regions_per_image") for n, r in rows.items() if "regions_per_image" in r}
        report["notes"].append(f"SAM label-map ids per image (0 = unsegmented included): {counts}")
        if counts and all(c <= 2 for v in counts.values() for c in v):
            report["notes"].append("SAM found (almost) no masks: the label maps are ~all unsegmented, the vote "
                                   "does ~nothing and merging has nothing to merge; use --masks synthetic")
    report["verdicts"] = verdicts(report)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.name = args.name or f"{args.device}_{args.backbone}"
    report = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"fidelity_{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
