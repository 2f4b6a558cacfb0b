"""A whole MaPLe run here is the official code's run (muzairkhattak/multimodal-prompt-learning on
Dassl): the quick start's digits, the shipped tiny CLIP, prompt depth 2, 16 shots, seed 1. The
official side is stored in tests/fixtures/parity/maple_whole_run.{json,safetensors}, written by
experiments/parity/maple_whole_run.py (which says how to run it again)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from src.common.dassl_checkpoint import read_dassl
from src.data.datasets.digits import CLASSNAMES
from src.methods.maple import MaPLe
from src.methods.released import prompt_from_dassl
from src.models.clip import FrozenCLIP, shipped_weights
from src.run.config import compose_config
from src.run.evaluation import evaluate
from src.run.training import train
from tests.conftest import make_cfg

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "maple_whole_run"
# Measured against the official run on CPU: 2.9e-6 at most (float rounding over 200 steps).
PROMPT_ATOL = 1e-3


@pytest.fixture(scope="module")
def official() -> dict:
    record = json.loads(FIXTURE.with_suffix(".json").read_text())
    tensors = load_file(str(FIXTURE.with_suffix(".safetensors")))
    for stage in ("init", "final"):
        record[stage] = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{stage}.")}
    return record


def learned(module: MaPLe) -> dict[str, torch.Tensor]:
    """MaPLe's learned tensors by the names the fixture stores them under."""
    return {
        "ctx": module.prompt_learner.ctx.detach(),
        "deep_text": module.deep_text.detach(),
        **{f"couplings.{k}": v for k, v in module.couplings.state_dict().items()},
    }


def test_maple_starts_where_the_official_run_starts(official):
    """From the run's seed: CLIP's construction, the context, then the first coupling, the deep
    prompts and the deep couplings, drawn in the official order."""
    settings = official["settings"]
    pl.seed_everything(settings["seed"], verbose=False)
    clip = FrozenCLIP(settings["model"], shipped_weights("coop-tiny-digits.safetensors"))
    module = MaPLe(clip, CLASSNAMES, prompt_depth=settings["prompt_depth"], n_ctx=settings["n_ctx"])
    start = learned(module)
    assert start.keys() == official["init"].keys()
    for name, tensor in official["init"].items():
        assert torch.equal(start[name], tensor), name


def test_a_whole_maple_run_is_the_official_run(official, cache_dir, tmp_path):
    """The same few-shot images, the same prompts after 5 epochs and the same test accuracy."""
    settings = official["settings"]
    overrides = [
        "experiment=quickstart",
        "method=maple",
        "model=tiny_pretrained",
        f"method.module.prompt_depth={settings['prompt_depth']}",
        f"ctx.n_ctx={settings['n_ctx']}",
        f"shots={settings['shots']}",
        f"seed={settings['seed']}",
        "baseline=null",
        f"paths.cache_dir={cache_dir}",
        "trainer.enable_progress_bar=false",
    ]
    results = train(make_cfg(overrides, tmp_path))
    fewshot = json.loads((tmp_path / "fewshot.json").read_text())
    for split in ("train", "val"):
        assert [item[:2] for item in fewshot[split]] == official["fewshot"][split]
    prompt = torch.load(tmp_path / "prompt.pt", weights_only=True)
    final = {"ctx": prompt["ctx"], **prompt["weights"]}
    differences = {name: (final[name] - v).abs().max().item() for name, v in official["final"].items()}
    assert max(differences.values()) <= PROMPT_ATOL, differences
    assert results["num_test"] == 361  # one test image is 0.28 points
    assert results["test_acc"] == pytest.approx(official["test_acc"], abs=1e-4)


def test_the_official_runs_own_checkpoint_is_its_prompts_and_accuracy(official, cache_dir, tmp_path):
    """tests/fixtures/dassl/maple: the checkpoint the official run's train.py wrote (Dassl's
    save_model, epoch 5), read by src.eval as a released prompt: the official run's final prompts,
    exactly, and its test accuracy."""
    folder = Path(__file__).parent / "fixtures" / "dassl" / "maple"
    checkpoint = read_dassl(folder)
    assert Path(checkpoint["file"]).name == "model.pth.tar-5" and checkpoint["epoch"] == 5
    clip = FrozenCLIP(official["settings"]["model"], shipped_weights("coop-tiny-digits.safetensors"))
    state = prompt_from_dassl(checkpoint, clip, CLASSNAMES)
    assert (
        state["method"] == "maple"
        and state["hparams"]["prompt_depth"] == official["settings"]["prompt_depth"]
    )
    released = {"ctx": state["ctx"], **state["weights"]}
    for name, tensor in official["final"].items():
        assert torch.equal(released[name], tensor), name
    args = [f"ckpt={folder}", "model=tiny_pretrained", "dataset=digits", f"paths.cache_dir={cache_dir}"]
    results = evaluate(compose_config("eval", [*args, "data.num_workers=0"], tmp_path / "eval"))
    assert results["test_acc"] == pytest.approx(official["test_acc"], abs=1e-4)
