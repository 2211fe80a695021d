"""DINO backbone: q+k features against a plainly written reference, renormalization, checkpoint files."""

from __future__ import annotations

import argparse
import math
import time
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from corrclip.models.checkpoints import WeightsError
from corrclip.models.dino import DinoFeatures, build_dino, clip_to_imagenet, interpolate_pos_embed_dino

# Written out again here (not imported) so a typo in the module's constants fails the tests.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _channels(values: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).view(1, 3, 1, 1)


def _perturbed_tiny(seed: int) -> VisionTransformer:
    """The tiny model with every weight moved off the seeded init, and large position embeddings.

    timm initializes pos_embed near zero, which would hide interpolation mistakes; and weights equal
    to build_dino's own random init would hide a loader that silently loads nothing.
    """
    vit = build_dino("tiny", "random")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        vit.pos_embed.copy_(torch.randn(vit.pos_embed.shape, generator=g))
    return vit


def _windows(b: int, h: int, w: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CLIP-normalized windows made from random 8-bit pixels."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (b, 3, h, w), generator=g).to(dtype) / 255
    return (pixels - _channels(CLIP_MEAN, dtype)) / _channels(CLIP_STD, dtype)


def _reference_renorm(windows: torch.Tensor) -> torch.Tensor:
    # Research code: un-normalize (x * std + mean), then normalize ((x - mean) / std), in x's dtype.
    dt = windows.dtype
    pixels = windows * _channels(CLIP_STD, dt) + _channels(CLIP_MEAN, dt)
    return (pixels - _channels(IMAGENET_MEAN, dt)) / _channels(IMAGENET_STD, dt)


def _reference_pos(pos_embed: torch.Tensor, num_patches: int, rows_px: int, cols_px: int) -> torch.Tensor:
    """DINO's rule: the table as is for a square input with the pretrained patch count; otherwise a
    bicubic resize of the square grid driven by the scale factor (cells + 0.1) / sqrt(N0) per axis."""
    pretrained = pos_embed.shape[1] - 1
    if num_patches == pretrained and rows_px == cols_px:
        return pos_embed
    side = math.sqrt(pretrained)
    rows, cols = rows_px // 8, cols_px // 8
    table = pos_embed[0, 1:].reshape(int(side), int(side), -1).permute(2, 0, 1).unsqueeze(0)
    resized = F.interpolate(table, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    assert resized.shape[-2:] == (rows, cols)
    patches = resized[0].permute(1, 2, 0).reshape(1, rows * cols, -1)
    return torch.cat([pos_embed[:, :1], patches], dim=1)


def _reference_features(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The research path on ImageNet-normalized images: every block runs, a hook grabs the last qkv."""
    b, _, rows_px, cols_px = images.shape
    tokens = vit.patch_embed.proj(images.to(vit.pos_embed.dtype)).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token.expand(b, -1, -1), tokens], dim=1)
    tokens = tokens + _reference_pos(vit.pos_embed, tokens.shape[1] - 1, rows_px, cols_px)
    captured = []
    hook = vit.blocks[-1].attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        for block in vit.blocks:
            tokens = block(tokens)
        vit.norm(tokens)
    finally:
        hook.remove()
    qkv = captured[0]
    q, k, _v = qkv.reshape(b, qkv.shape[1], 3, -1).unbind(2)
    feats = (q + k)[:, 1:]
    return feats / feats.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def tiny() -> VisionTransformer:
    return _perturbed_tiny(seed=1)


@pytest.mark.parametrize("h,w", [(224, 224), (336, 336), (280, 336), (112, 448)])
def test_features_match_reference(tiny: VisionTransformer, h: int, w: int) -> None:
    windows = _windows(3, h, w)
    model = DinoFeatures(tiny)
    with torch.no_grad():
        ours = model(windows)
        ref = _reference_features(tiny, _reference_renorm(windows))
    assert model.grid(h, w) == (h // 8, w // 8)
    assert ours.shape == (3, (h // 8) * (w // 8), 64)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_pos_embed_matches_f_interpolate(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(9)
    pos_embed = torch.randn(1, 1 + 28 * 28, 16, generator=g).to(dtype)
    # Shrinking, identity-sized but not square, CorrCLIP's 42 cells, and larger.
    for rows, cols in [(14, 14), (28, 35), (35, 28), (42, 42), (7, 112), (60, 1)]:
        ours = interpolate_pos_embed_dino(pos_embed, rows * 8, cols * 8, 8)
        ref = _reference_pos(pos_embed, rows * cols, rows * 8, cols * 8)
        assert ours.dtype == dtype and ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < tol, (rows, cols)
    # The pretrained square size is returned untouched, bit for bit.
    assert torch.equal(interpolate_pos_embed_dino(pos_embed, 224, 224, 8), pos_embed)


def test_export_keeps_batch_and_sides_dynamic(tiny: VisionTransformer) -> None:
    model = DinoFeatures(tiny)
    auto = torch.export.Dim.AUTO
    program = torch.export.export(model, (_windows(2, 280, 336),),
                                  dynamic_shapes={"windows": {0: auto, 2: auto, 3: auto}})
    # Other batch sizes, both interpolation branches, and the axes swapped.
    for b, h, w in [(3, 224, 224), (2, 336, 280), (2, 112, 448)]:
        windows = _windows(b, h, w, seed=10)
        with torch.no_grad():
            assert (program.module()(windows) - model(windows)).abs().max().item() < 1e-6, (b, h, w)


def test_each_window_is_independent(tiny: VisionTransformer) -> None:
    windows = _windows(3, 280, 336, seed=2)
    model = DinoFeatures(tiny)
    with torch.no_grad():
        batched = model(windows)
        single = model(windows[1:2])
    assert (batched[1:2] - single).abs().max().item() < 1e-5
    assert (batched[0] - batched[1]).abs().max().item() > 1e-2


def test_rejects_sides_not_multiple_of_patch(tiny: VisionTransformer) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        DinoFeatures(tiny)(_windows(1, 60, 64))


def test_renormalization_formula() -> None:
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (2, 3, 16, 24), generator=g)
    clip_in = (pixels / 255.0 - _channels(CLIP_MEAN, torch.float32)) / _channels(CLIP_STD, torch.float32)
    out = clip_to_imagenet(clip_in)
    assert out.dtype == torch.float32
    f64 = torch.float64
    # The same chain in float64 on the same input ...
    chain = (clip_in.double() * _channels(CLIP_STD, f64) + _channels(CLIP_MEAN, f64)
             - _channels(IMAGENET_MEAN, f64)) / _channels(IMAGENET_STD, f64)
    assert (out.double() - chain).abs().max().item() < 1e-6
    # ... which is the ImageNet normalization of the pixels up to float32 rounding.
    direct = (pixels.double() / 255 - _channels(IMAGENET_MEAN, f64)) / _channels(IMAGENET_STD, f64)
    assert (out.double() - direct).abs().max().item() < 1e-6
    # A float64 input is renormalized in float64.
    assert (clip_to_imagenet(clip_in.double()) - chain).abs().max().item() < 1e-12


def test_renormalization_runs_in_input_dtype_then_casts() -> None:
    vit = _perturbed_tiny(seed=4).double()
    windows = _windows(1, 64, 64, seed=5)  # float32 input, float64 model
    with torch.no_grad():
        ours = DinoFeatures(vit)(windows)
        in_input_dtype = _reference_features(vit, _reference_renorm(windows).double())
        in_model_dtype = _reference_features(vit, _reference_renorm(windows.double()))
    assert ours.dtype == torch.float64
    assert (ours - in_input_dtype).abs().max().item() < 1e-12
    # The float32 rounding is visible, so computing in the model's dtype would fail the check above.
    assert (ours - in_model_dtype).abs().max().item() > 1e-10


def _features(vit: VisionTransformer) -> torch.Tensor:
    with torch.no_grad():
        return DinoFeatures(vit)(_windows(1, 64, 80, seed=6))


def test_checkpoint_round_trips(tmp_path) -> None:
    source = _perturbed_tiny(seed=7)
    sd = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
    flat = tmp_path / "flat.pth"
    torch.save(sd, flat)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"teacher": {"module." + k: v for k, v in sd.items()}, "epoch": 100}, wrapped)
    tensors = tmp_path / "flat.safetensors"
    save_file(sd, str(tensors))
    # DINO's own training checkpoint: MultiCropWrapper prefixes, a projection head, pickled args.
    training = tmp_path / "checkpoint.pth"
    teacher = {"backbone." + k: v for k, v in sd.items()} | {"head.mlp.0.weight": torch.ones(4, 64)}
    student = {"module.backbone." + k: -v for k, v in sd.items()}  # not the one DINO evaluates
    args = argparse.Namespace(arch="vit_small", patch_size=8)
    torch.save({"teacher": teacher, "student": student, "args": args, "epoch": 100}, training)
    expected = _features(source)
    assert not torch.equal(expected, _features(build_dino("tiny", "random")))
    for path in (flat, wrapped, tensors, training):
        loaded = build_dino("tiny", str(path))
        assert not loaded.training
        assert torch.equal(_features(loaded), expected), path.name


def _other_vit(embed_dim: int, depth: int, heads: int) -> VisionTransformer:
    return VisionTransformer(img_size=224, patch_size=8, embed_dim=embed_dim, depth=depth, num_heads=heads,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0)


@pytest.mark.parametrize("shape", [(96, 2, 2), (64, 3, 2)], ids=["wider", "deeper"])
def test_checkpoint_of_another_architecture(tmp_path, shape: tuple[int, int, int]) -> None:
    path = tmp_path / "other.pth"
    torch.save(_other_vit(*shape).state_dict(), path)
    with pytest.raises(WeightsError, match="another architecture"):
        build_dino("tiny", str(path))


@pytest.mark.parametrize("name", ["junk.pth", "junk.safetensors"])
def test_garbage_file(tmp_path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(WeightsError):
        build_dino("tiny", str(path))


def test_missing_file(tmp_path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        build_dino("tiny", str(tmp_path / "absent.pth"))


def test_tiny_has_no_official_weights() -> None:
    with pytest.raises(WeightsError):
        build_dino("tiny", "official")


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="dino_vitb8"):
        build_dino("dino_vitl8", "random")


@pytest.mark.parametrize("name,file", [("dino_vitb8", "dino_vitbase8_pretrain.pth"),
                                       ("dino_vits8", "dino_deitsmall8_pretrain.pth")])
def test_official_without_network(tmp_path, monkeypatch, name: str, file: str) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored when the test ends
    torch.hub.set_dir(str(tmp_path))
    urls = []

    def offline(url: str, dst: str, *args, **kwargs) -> None:
        urls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    from corrclip.models import checkpoints

    # The host answers but the download fails: the official URL was tried once.
    monkeypatch.setattr(checkpoints, "reachable", lambda host, timeout=3.0: True)
    with pytest.raises(WeightsError, match="--dino-weights"):
        build_dino(name, "official")
    assert urls == [f"https://dl.fbaipublicfiles.com/dino/{file[:-4]}/{file}"]
    # The host does not answer: one line at once, no download attempt.
    monkeypatch.setattr(checkpoints, "reachable", lambda host, timeout=3.0: False)
    with pytest.raises(WeightsError, match="dl.fbaipublicfiles.com cannot be reached.*--dino-weights"):
        build_dino(name, "official")
    assert len(urls) == 1


def _check_architecture(vit: VisionTransformer, dim: int, depth: int, heads: int) -> None:
    # The reference test reuses timm's blocks, so their settings are checked here instead.
    assert not vit.training
    assert vit.embed_dim == dim and len(vit.blocks) == depth
    assert vit.cls_token.shape == (1, 1, dim) and vit.pos_embed.shape == (1, 1 + 28 * 28, dim)
    assert vit.patch_embed.proj.kernel_size == (8, 8) and vit.patch_embed.proj.stride == (8, 8)
    assert isinstance(vit.head, nn.Identity)
    norms = [m for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * depth + 1 and all(m.eps == 1e-6 for m in norms)
    acts = [m for m in vit.modules() if isinstance(m, nn.GELU)]
    assert len(acts) == depth and all(m.approximate == "none" for m in acts)
    for block in vit.blocks:
        assert block.attn.num_heads == heads and block.attn.qkv.bias is not None
        assert block.mlp.fc1.out_features == 4 * dim


@pytest.mark.parametrize("name,dim,depth,heads", [("tiny", 64, 2, 2), ("dino_vitb8", 768, 12, 12)])
def test_architecture(name: str, dim: int, depth: int, heads: int) -> None:
    _check_architecture(build_dino(name, "random"), dim, depth, heads)


def test_cached_official_file_of_another_architecture(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored when the test ends
    torch.hub.set_dir(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.save(_perturbed_tiny(seed=8).state_dict(), tmp_path / "checkpoints" / "dino_deitsmall8_pretrain.pth")

    def offline(*args, **kwargs) -> None:
        raise AssertionError("a cached checkpoint must not be downloaded again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match="another architecture"):
        build_dino("dino_vits8", "official")


def test_full_size_smoke() -> None:
    start = time.perf_counter()
    vit = build_dino("dino_vits8", "random")
    _check_architecture(vit, 384, 12, 6)
    with torch.no_grad():
        feats = DinoFeatures(vit)(_windows(1, 224, 224))
    assert feats.shape == (1, 784, 384)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(1, 784), atol=1e-5)
    print(f"dino_vits8 build + one 224 window: {time.perf_counter() - start:.1f} s")
