"""SAM builders, checkpoints and graph wrappers on the tiny architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from corrclip.models.checkpoints import WeightsError
from corrclip.models.sam import SamDecoder, SamEncoder, build_sam, sam_preprocess


@pytest.fixture(scope="module")
def sam() -> Sam:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return build_sam("tiny", "random")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img = np.random.default_rng(0).integers(0, 256, (60, 84, 3), dtype=np.uint8)
    img[10:40, 20:50] = (220, 40, 40)
    return img


def perturbed_state_dict(sam: Sam) -> dict[str, torch.Tensor]:
    """Weights that differ from build_sam's seeded ones, so a silently ignored file would show."""
    g = torch.Generator().manual_seed(1)
    return {k: (v + 0.1 * torch.randn(v.shape, generator=g)).contiguous() for k, v in sam.state_dict().items()}


@pytest.fixture(scope="module")
def embeddings(sam: Sam, image: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return SamEncoder(sam)(sam_preprocess(sam, image)[0])


def decode(sam: Sam, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.tensor([[[100.0, 200.0]], [[900.0, 30.0]]])
    return SamDecoder(sam)(embeddings, coords, torch.ones(2, 1, dtype=torch.int32))


@torch.no_grad()
def test_tiny_is_small_and_reproducible(sam: Sam) -> None:
    assert not sam.training
    assert sum(p.numel() for p in sam.parameters()) < 1_000_000
    again = build_sam("tiny", "random")
    for (k, a), b in zip(sam.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_checkpoint_round_trip(sam: Sam, embeddings: torch.Tensor, tmp_path, fmt: str) -> None:
    sd = perturbed_state_dict(sam)
    path = tmp_path / f"tiny.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    loaded = build_sam("tiny", str(path))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k

    reference = build_sam("tiny", "random")
    reference.load_state_dict(sd)
    # the decoder only: the encoder is the slow part and its weights were compared above
    for a, b, c in zip(decode(loaded, embeddings), decode(reference, embeddings), decode(sam, embeddings),
                       strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)  # the file's weights were really used


def test_checkpoint_of_another_size(sam: Sam, tmp_path) -> None:
    sd = dict(sam.state_dict())
    sd["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)  # a ViT-B patch embedding
    path = tmp_path / "other.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="another shape") as e:
        build_sam("tiny", str(path))
    assert "looks like SAM 'vit_b'" in str(e.value) and "'tiny'" in str(e.value)

    del sd["image_encoder.neck.0.weight"]
    torch.save(sd, path)
    with pytest.raises(WeightsError, match="missing"):
        build_sam("tiny", str(path))


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors"])
def test_garbage_file(tmp_path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(WeightsError):
        build_sam("tiny", str(path))
    with pytest.raises(WeightsError, match="not found"):
        build_sam("tiny", str(tmp_path / "missing.pth"))


def test_official_without_network(tmp_path, monkeypatch) -> None:
    def blocked(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", blocked)
    with pytest.raises(WeightsError, match="--sam-weights") as e:
        build_sam("vit_b", "official")
    assert "sam_vit_b_01ec64.pth" in str(e.value)
    with pytest.raises(WeightsError):
        build_sam("tiny", "official")
    with pytest.raises(ValueError):
        build_sam("vit_x", "random")


@torch.no_grad()
def test_preprocess_and_encoder_match_predictor(sam: Sam, image: np.ndarray, embeddings: torch.Tensor) -> None:
    x, input_size = sam_preprocess(sam, image)
    assert x.shape == (1, 3, 1024, 1024) and input_size == (731, 1024)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    assert predictor.input_size == input_size
    assert embeddings.shape == (1, 32, 64, 64)
    torch.testing.assert_close(embeddings, predictor.features, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_matches_sam_forward(sam: Sam, image: np.ndarray, embeddings: torch.Tensor,
                                     dtype: torch.dtype) -> None:
    # five prompts of two points each: positive, negative and padding (-1) labels
    coords = torch.tensor([[[10.5, 20.0], [500.0, 600.0]], [[1000.0, 700.0], [3.0, 4.0]], [[512.0, 365.0], [0, 0]],
                           [[700.25, 100.0], [650.0, 120.0]], [[0.0, 0.0], [1023.0, 730.0]]], dtype=dtype)
    labels = torch.tensor([[1, 1], [1, 0], [1, -1], [0, 1], [1, 1]], dtype=torch.int32)
    resized = SamPredictor(sam).transform.apply_image(image)
    ref = sam([{"image": torch.as_tensor(resized).permute(2, 0, 1), "original_size": image.shape[:2],
                "point_coords": coords, "point_labels": labels}], multimask_output=True)[0]

    low, iou = SamDecoder(sam)(embeddings, coords, labels)
    assert low.shape == (5, 3, 256, 256) and iou.shape == (5, 3)
    torch.testing.assert_close(low, ref["low_res_logits"], rtol=0, atol=0)
    torch.testing.assert_close(iou, ref["iou_predictions"], rtol=0, atol=0)
