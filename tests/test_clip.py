"""The frozen backbone: architectures by name, weights by tag or file, clear errors offline."""

from __future__ import annotations

import open_clip
import pytest
import torch

from src.models.clip import FrozenCLIP, WeightsUnavailableError


def test_tiny_architecture_ships_with_the_package(tiny_clip):
    assert tiny_clip.image_size == 32
    assert tiny_clip.model.transformer.width == 64 and len(tiny_clip.model.transformer.resblocks) == 2
    assert all(not p.requires_grad for p in tiny_clip.parameters())
    assert not tiny_clip.train().training


def test_local_weights_file(tmp_path):
    torch.manual_seed(3)
    source = open_clip.create_model("coop-tiny")
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    clip = FrozenCLIP("coop-tiny", str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(clip.model.state_dict()[key], value), key


def test_weights_that_cannot_be_fetched_name_the_ways_out(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        FrozenCLIP("RN50-quickgelu", "openai")
    message = str(err.value)
    assert "model.pretrained=<file>" in message and "model=tiny" in message
    assert "\n" not in message


def test_missing_weights_file_and_unknown_architecture():
    with pytest.raises(WeightsUnavailableError, match="model.pretrained='/no/such/file.pt'"):
        FrozenCLIP("coop-tiny", "/no/such/file.pt")
    with pytest.raises(ValueError, match="model.name='ViT-Q-99'"):
        FrozenCLIP("ViT-Q-99", None)


def test_rn50_batchnorm_stays_in_eval_mode():
    clip = FrozenCLIP("RN50", None)
    clip.train()
    batchnorms = [m for m in clip.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
