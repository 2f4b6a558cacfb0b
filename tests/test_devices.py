"""Modules built on a backbone that already sits on another device than the CPU (a GPU, say) put
everything they build there: token ids come from the tokenizer on the CPU and must follow the
embedding table. Checked on PyTorch's `meta` device, which every CPU machine has."""

from __future__ import annotations

import pytest
import torch

from src.methods.cocoop import CoCoOp
from src.methods.coop import CoOp
from src.methods.zeroshot import ZeroShotCLIP
from src.models.clip import FrozenCLIP

CLASSNAMES = ["tench", "great white shark", "Komodo"]


@pytest.fixture(scope="module")
def meta_clip() -> FrozenCLIP:
    torch.manual_seed(0)
    clip = FrozenCLIP("coop-tiny", None).to("meta")
    assert clip.token_embedding.weight.device.type == "meta"
    return clip


def devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"ctx_init": "a photo of a", "class_token_position": "middle"},
        {"class_specific": True, "class_token_position": "front"},
    ],
)
@pytest.mark.parametrize("text_path", ["batched", "reference"])
def test_coop_built_on_the_backbones_device_runs_there(meta_clip, options, text_path):
    saved = meta_clip.text.path
    meta_clip.text.path = text_path
    try:
        module = CoOp(meta_clip, CLASSNAMES, n_ctx=4, **options)
        assert devices(module.prompt_learner) == {"meta"}
        features = module.text_features()
    finally:
        meta_clip.text.path = saved
    assert features.device.type == "meta"
    assert features.shape == (len(CLASSNAMES), meta_clip.model.text_projection.shape[1])


def test_cocoop_and_zeroshot_build_on_the_backbones_device(meta_clip):
    cocoop = CoCoOp(meta_clip, CLASSNAMES, n_ctx=4)
    assert devices(cocoop.prompt_learner) == {"meta"} and cocoop.ctx_mask.device.type == "meta"
    zeroshot = ZeroShotCLIP(meta_clip, CLASSNAMES, ["a photo of a {}."])
    features = zeroshot.text_features()
    assert features.device.type == "meta" and features.shape[0] == len(CLASSNAMES)
