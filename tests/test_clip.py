"""The frozen backbone: architectures by name, weights by tag or file, clear errors offline."""

from __future__ import annotations

import open_clip
import pytest
import torch

from src.models import weights
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
    """The host answered the probe, then the download failed."""

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "_connect", lambda host, port: None)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        FrozenCLIP("RN50-quickgelu", "openai")
    message = str(err.value)
    assert "model.pretrained=<file>" in message and "model=tiny" in message
    assert "\n" not in message


def test_missing_weights_file_and_unknown_architecture():
    with pytest.raises(WeightsUnavailableError, match="model.pretrained=/no/such/file.pt: no such file"):
        FrozenCLIP("coop-tiny", "/no/such/file.pt")
    with pytest.raises(ValueError, match="model.name='ViT-Q-99'"):
        FrozenCLIP("ViT-Q-99", None)


def test_rn50_batchnorm_stays_in_eval_mode():
    clip = FrozenCLIP("RN50", None)
    clip.train()
    batchnorms = [m for m in clip.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)


@pytest.fixture
def no_network(monkeypatch) -> list[tuple[str, int]]:
    """Connection probes fail (and are recorded) without touching the network; nothing downloads."""
    probes: list[tuple[str, int]] = []

    def unreachable(host: str, port: int) -> str:
        probes.append((host, port))
        return f"no connection to {host}:{port}: Name or service not known"

    def no_download(*args, **kwargs):
        raise AssertionError("open_clip was asked to load weights that check_weights knows it cannot get")

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(weights, "_connect", unreachable)
    monkeypatch.setattr(open_clip, "create_model", no_download)
    return probes


def test_without_network_the_weights_error_comes_at_once(no_network, monkeypatch, tmp_path):
    cache = tmp_path / "weights"
    with pytest.raises(WeightsUnavailableError) as err:
        FrozenCLIP("RN50-quickgelu", "openai", cache_dir=str(cache))
    assert no_network == [("huggingface.co", 443)]  # open_clip takes OpenAI's weights from the hub
    message = str(err.value)
    assert message.startswith(
        f"model.pretrained=openai: the RN50-quickgelu weights are not in open_clip's cache ({cache}) and "
        "cannot be downloaded from https://huggingface.co/timm/resnet50_clip.openai now (no connection to "
        "huggingface.co:443: Name or service not known); give a local file with model.pretrained=<file> "
        "(e.g. RN50.pt from https://openaipublic."
    )
    assert "\n" not in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # said offline: not even a probe
    with pytest.raises(WeightsUnavailableError, match=r"now \(HF_HUB_OFFLINE=1\); give a local file"):
        weights.check_weights("RN50-quickgelu", "openai", str(cache))
    assert len(no_network) == 1


def test_cached_weights_need_no_network(no_network, monkeypatch, tmp_path):
    # the hub's cache layout: models--<org>--<name>/refs/main -> snapshots/<revision>/<file>
    repo = tmp_path / "hub" / "models--timm--resnet50_clip.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights.check_weights("RN50-quickgelu", "openai", str(tmp_path / "hub"))
    # without huggingface_hub, open_clip downloads OpenAI's file with urllib (into model.cache_dir)
    monkeypatch.setattr(weights, "has_hf_hub", lambda: False)
    with pytest.raises(WeightsUnavailableError, match="from https://openaipublic.azureedge.net/.*/RN50.pt"):
        weights.check_weights("RN50-quickgelu", "openai", str(tmp_path / "clip"))
    assert no_network == [("openaipublic.azureedge.net", 443)]
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "RN50.pt").write_bytes(b"weights")
    weights.check_weights("RN50-quickgelu", "openai", str(tmp_path / "clip"))
    assert len(no_network) == 1


def test_the_probe_goes_to_the_proxy_when_there_is_one(no_network, monkeypatch):
    assert weights._unreachable("https://huggingface.co") is not None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    weights._unreachable("https://huggingface.co")
    assert no_network == [("huggingface.co", 443), ("proxy.example", 3128)]


def test_an_unknown_tag_names_the_known_ones():
    with pytest.raises(WeightsUnavailableError, match=r"neither a file nor a tag .*tags: openai, yfcc15m"):
        weights.check_weights("RN50-quickgelu", "opneai")
