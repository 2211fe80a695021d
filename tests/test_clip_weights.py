"""CLIP weights: local files in open_clip's formats, wrong architectures, unreachable official tags."""

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from corrclip.models.build import resolve_clip
from corrclip.models.checkpoints import WeightsError
from corrclip.models.clip import build_clip
from corrclip.presets import BACKBONES


def _perturbed_tiny():
    model = build_clip("tiny", "random")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("fmt", ["plain", "wrapped", "safetensors"])
def test_round_trip(tmp_path, fmt):
    src = _perturbed_tiny()
    sd = src.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "plain":
        torch.save(sd, path)
    elif fmt == "wrapped":  # the MetaCLIP/open_clip training checkpoint layout
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = build_clip("tiny", str(path))
    tok = open_clip.get_tokenizer("ViT-B-16")(["a photo of a cat."])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tok), src.encode_text(tok))
        x = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(loaded.encode_image(x), src.encode_image(x))


def test_wrong_architecture_and_garbage(tmp_path):
    sd = {k: v[..., :2].clone() if v.ndim else v for k, v in build_clip("tiny", "random").state_dict().items()}
    torch.save(sd, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="another architecture"):
        build_clip("tiny", str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        build_clip("tiny", str(tmp_path / "junk.pt"))


def test_unreachable_official_weights_name_the_flag(monkeypatch):
    def offline(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(WeightsError, match="--clip-weights"):
        build_clip("ViT-B-16-quickgelu", "metaclip_fullcc")


def test_unknown_tag_lists_known_ones():
    with pytest.raises(WeightsError, match="metaclip_fullcc"):
        build_clip("ViT-B-16-quickgelu", "no_such_tag")


def test_resolve_clip_choices():
    vit_b = BACKBONES["vit_b"]
    assert resolve_clip(vit_b, "official", None) == ("ViT-B-16-quickgelu", "metaclip_fullcc")
    assert resolve_clip(vit_b, "random", None) == ("ViT-B-16-quickgelu", "random")
    assert resolve_clip(vit_b, "official", "openai") == ("ViT-B-16", "openai")
    assert resolve_clip(vit_b, "official", "ViT-B-16:laion2b_s34b_b88k") == ("ViT-B-16", "laion2b_s34b_b88k")
    with pytest.raises(WeightsError):
        resolve_clip(BACKBONES["vit_h"], "official", "openai")
