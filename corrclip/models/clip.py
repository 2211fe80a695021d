"""CLIP through open_clip: loading, the text tower, and the CorrCLIP surgery on the image tower.

The trunk (`ClipTrunk`) runs blocks 1..L-1 unmodified for the image tokens, carries one mask class
token (MCT) per region beside them, and returns what the correlation head needs:
  * the last block's value path for the main stream (input of block L) and the spatial stream
    (mean of NUM_SPATIAL earlier streams), on the CLIP grid;
  * the MCTs after the *full* last block (the semantic branch).

An MCT attends to the CLS token and to the patches of its own region, nothing else; image tokens
never attend to MCTs. So the image tokens are computed exactly as vanilla CLIP computes them, and
an MCT only needs the image tokens' keys and values of the same block. We exploit that instead of
building the research code's joint (R + 1 + n)^2 attention mask: same numbers, far less work.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .bicubic import plus_tenth_step, resize_grid
from .checkpoints import WeightsError, load_into, load_state_dict, require_download, seeded

TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(layers=6, width=64, head_width=32, patch_size=16, image_size=224),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    quick_gelu=True,
)


def num_spatial_layers(depth: int) -> int:
    """How many block outputs the spatial branch averages (research rule: 5, 12, 28, else L-4)."""
    return {12: 5, 24: 12, 32: 28}.get(depth, depth - 4)


def build_clip(arch: str, weights: str = "official", *, device: str | torch.device = "cpu") -> nn.Module:
    """An open_clip CLIP model. `weights`: an open_clip pretrained tag, "random", or a local file.

    arch "tiny" is a 6-layer, width-64 CLIP for tests and quick smoke runs ("random" or a file).
    """
    if arch == "tiny":
        with seeded(0):
            model = open_clip.CLIP(**TINY_CLIP)
        if weights not in ("random", "official"):
            load_into(model, _clip_state_dict(weights), str(weights))
        elif weights == "official":
            raise WeightsError("the tiny CLIP has no official weights: use --weights random or a local file")
    elif weights == "random":
        with seeded(0), _quiet_open_clip():
            model = open_clip.create_model(arch, pretrained=None)
    elif _is_file(weights):
        with seeded(0), _quiet_open_clip():
            model = open_clip.create_model(arch, pretrained=None)
        load_into(model, _clip_state_dict(weights), str(weights))
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch) if arch in open_clip.list_models() else []
        if arch not in open_clip.list_models():
            raise WeightsError(f"unknown open_clip architecture {arch!r}")
        if weights not in tags:
            raise WeightsError(f"{arch} has no open_clip pretrained tag {weights!r}; known: {', '.join(tags)}")
        model = _official_clip(arch, weights)
    return model.eval().to(device)


def _official_clip(arch: str, tag: str) -> nn.Module:
    """open_clip's pretrained weights: from the local cache without touching the network when they are there;
    otherwise one short reachability check, then open_clip's own download (which retries for a minute offline)."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    repo, filename = os.path.split(cfg.get("hf_hub", ""))
    use_hub = bool(repo) and open_clip.pretrained.has_hf_hub()
    url = f"https://huggingface.co/{repo}" if use_hub else cfg.get("url", "")
    what = f"the CLIP weights {arch}:{tag} ({url})"
    cached = _cached_clip(repo, filename, use_hub, cfg.get("url", ""))
    if not cached:
        require_download(url, what, "--clip-weights")
    try:
        with _hub_offline(cached and use_hub):
            return open_clip.create_model(arch, pretrained=tag)
    except Exception as e:  # noqa: BLE001 - downloads fail in many ways; one piece of advice
        raise WeightsError(f"could not load {what} ({type(e).__name__}: {str(e)[:160]}). Download the checkpoint "
                           "elsewhere and pass --clip-weights FILE, or use --weights random for a smoke run.") from e


def _cached_clip(repo: str, filename: str, use_hub: bool, url: str) -> bool:
    """Whether open_clip will find the weights on disk (Hugging Face cache, or its URL cache ~/.cache/clip)."""
    if use_hub:
        from huggingface_hub import try_to_load_from_cache

        filename = filename or "open_clip_pytorch_model.bin"
        stem = os.path.splitext(filename)[0]
        names = [filename, f"{stem}.safetensors", "open_clip_model.safetensors"]
        return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
    return bool(url) and os.path.isfile(os.path.expanduser(f"~/.cache/clip/{os.path.basename(url)}"))


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs "No pretrained weights loaded ... initialized randomly" on the root logger; we say it once."""
    import logging

    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


@contextlib.contextmanager
def _hub_offline(on: bool):
    """Hugging Face hub in offline mode for one call: a cached file then loads without a network round trip."""
    if not on:
        yield
        return
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def _is_file(weights: str) -> bool:
    return os.sep in weights or Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors")


def _clip_state_dict(path: str) -> dict[str, torch.Tensor]:
    sd = load_state_dict(path, nested_keys=("state_dict", "model"))
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# --------------------------------------------------------------------------------------------
# Text tower


class ClipText(nn.Module):
    """Token ids [Q, L] -> text embeddings [Q, E] (projected, not normalized).

    The text transformer is causal and pools at the end-of-text token (the largest id), so tokens
    after the longest prompt's end never influence the result: callers may trim L below 77.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        # One spare row/column: slicing [:n] is then a strict sub-slice for every n <= 77, which
        # keeps torch.export from specializing the dynamic length at n == 77.
        pos = clip.positional_embedding.detach()
        self.register_buffer("positional_embedding", torch.cat([pos, pos[-1:]]), persistent=False)
        mask = clip.attn_mask
        self.register_buffer("attn_mask", F.pad(mask, (0, 1, 0, 1), value=float("-inf")), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        dtype = self.ln_final.weight.dtype if self.token_embedding.weight.dtype == torch.float32 \
            else self.token_embedding.weight.dtype
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding[:n].to(dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


# --------------------------------------------------------------------------------------------
# Image tower with the CorrCLIP surgery


def interpolate_pos_embed_clip(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + g0*g0, D] -> [1 + gh*gw, D], bicubic with the DINO-style scale factor (g + 0.1) / g0.

    The research code maps coordinates with 14/21.1 (not 14/21) at 336/16; interpolating to a
    target *size* would differ by up to ~0.5. While torch.export traces, the same resize runs as
    matrix products (`pos_embed_for_export`) so that the grid, hence the window size, stays dynamic.
    """
    if torch.compiler.is_exporting():
        return pos_embed_for_export(pos, grid)
    g0 = int(math.sqrt(pos.shape[0] - 1))
    gh, gw = grid
    if (gh, gw) == (g0, g0):
        return pos
    patch = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0), mode="bicubic",
                          align_corners=False)
    assert patch.shape[-2:] == (gh, gw), (patch.shape, grid)
    patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(gh * gw, -1)
    return torch.cat([pos[:1], patch], dim=0)


def pos_embed_for_export(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """interpolate_pos_embed_clip without Python-float scale factors or a Python branch on the grid
    (both would freeze the window size into an exported graph); agrees with it to ~1e-6, and is the
    table itself, bit for bit, at the native grid."""
    g0 = int(math.sqrt(pos.shape[0] - 1))
    gh, gw = grid

    def scalar(v: int) -> torch.Tensor:
        return torch.full((), v, dtype=torch.float64, device=pos.device)

    keep = (scalar(gh) == g0) & (scalar(gw) == g0)
    table = pos[1:].float().reshape(g0, g0, -1)  # float32 like the eager path
    patch = resize_grid(table, gh, gw, plus_tenth_step(gh, g0, keep, torch.float32),
                        plus_tenth_step(gw, g0, keep, torch.float32))
    return torch.cat([pos[:1], patch.reshape(gh * gw, -1).to(pos.dtype)], dim=0)


def embed_windows(visual: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """windows [B,3,h,w] -> tokens [B,1+n,D]: patches, CLS, positional embedding, ln_pre (every method)."""
    x = visual.conv1(windows.to(visual.conv1.weight.dtype))  # [B, D, gh, gw]
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + interpolate_pos_embed_clip(visual.positional_embedding, (gh, gw)).to(x.dtype)
    return visual.ln_pre(x)


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)


class ClipTrunk(nn.Module):
    """windows [B,3,h,w] + region membership [B,R,n] -> (values [B,2,D,gh,gw], region tokens [B,R,D]).

    `regions[b, r, j]` is True when patch j of window b lies in region r (on the CLIP grid).
    `values[:, 0]` is the main stream's value path, `values[:, 1]` the spatial stream's, both
    ln_1(x) W_v^T + b_v of the last block, CLS dropped, laid out on the CLIP grid.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.patch = visual.conv1.kernel_size[0]
        self.width = visual.conv1.out_channels
        self.n_head = self.blocks[0].attn.num_heads
        depth = len(self.blocks)
        k = num_spatial_layers(depth)
        # 0-based indices of the block outputs averaged by the spatial branch: L-2-k .. L-3.
        self.spatial_blocks = tuple(range(depth - 2 - k, depth - 2))

    def embed(self, windows: torch.Tensor) -> torch.Tensor:
        return embed_windows(self.visual, windows)

    def _attend(self, blk: nn.Module, x: torch.Tensor, m: torch.Tensor | None, mct_bias: torch.Tensor,
                image_out: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One block: image tokens x [B,T,D] as vanilla CLIP, MCTs m [B,R,D] against x's keys/values."""
        attn = blk.attn
        d = self.width
        h = blk.ln_1(x)
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = (_heads(t, self.n_head) for t in qkv.split(d, dim=-1))
        hm = blk.ln_1(m)
        qm = _heads(F.linear(hm, attn.in_proj_weight[:d], attn.in_proj_bias[:d]), self.n_head)
        om = F.scaled_dot_product_attention(qm, k, v, attn_mask=mct_bias)
        m = m + blk.ls_1(attn.out_proj(_merge_heads(om)))
        m = m + blk.ls_2(blk.mlp(blk.ln_2(m)))
        if not image_out:
            return None, m
        o = F.scaled_dot_product_attention(q, k, v)
        x = x + blk.ls_1(attn.out_proj(_merge_heads(o)))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return x, m

    def value_path(self, x: torch.Tensor) -> torch.Tensor:
        """ln_1(x) W_v^T + b_v of the last block."""
        blk = self.blocks[-1]
        d = self.width
        return F.linear(blk.ln_1(x), blk.attn.in_proj_weight[2 * d:], blk.attn.in_proj_bias[2 * d:])

    def forward(self, windows: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(windows)
        b, t, d = x.shape
        gh, gw = windows.shape[-2] // self.patch, windows.shape[-1] // self.patch
        # Every MCT sees CLS; patch j only when j lies in its region. -inf elsewhere (never a full row).
        allowed = torch.cat([torch.ones_like(regions[:, :, :1]), regions], dim=2).bool()
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        bias = bias[:, None]  # broadcast over heads
        m = x[:, :1].expand(b, regions.shape[1], d)  # MCTs start as the CLS token after ln_pre
        spatial = torch.zeros_like(x)
        for i, blk in enumerate(self.blocks[:-1]):
            x, m = self._attend(blk, x, m, bias)
            if i in self.spatial_blocks:
                spatial = spatial + x
        spatial = spatial / len(self.spatial_blocks)
        values = self.value_path(torch.stack([x, spatial], dim=1))[:, :, 1:]  # [B, 2, n, D]
        values = values.transpose(2, 3).reshape(b, 2, d, gh, gw)
        _, m = self._attend(self.blocks[-1], x, m, bias, image_out=False)
        return values, m

