"""Evaluating a saved prompt on any dataset: the same test as training, transfer, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from src.common.files import save_torch
from src.common.prompt_file import load_prompt
from src.methods.coop import CoOp
from src.run.config import compose_config
from src.run.evaluation import evaluate
from src.run.training import train
from tests.conftest import CONF_DIR, make_cfg


def test_evaluating_a_run_prompt_repeats_its_test_and_transfers(tiny_overrides, eval_overrides, tmp_path):
    run = tmp_path / "run"
    trained = train(
        make_cfg(["dataset=oxford_pets", "shots=2", "trainer.max_epochs=1", *tiny_overrides], run)
    )
    ckpt = run / "prompt.pt"
    cfg = compose_config("eval", [f"ckpt={ckpt}", "dataset=oxford_pets", *eval_overrides], tmp_path / "same")
    assert cfg.model.name == "coop-tiny" and cfg.model.pretrained is None  # the prompt's own backbone
    same = evaluate(cfg)
    assert same["test_acc"] == trained["test_acc"] and same["test_macro_acc"] == trained["test_macro_acc"]
    assert same["trained_on"] == "oxford_pets" and same["ckpt"] == str(ckpt) and same["seed"] == 1
    assert json.loads((tmp_path / "same" / "results.json").read_text()) == same

    # the run's folder and its last.ckpt hold the same prompt (an unfinished run has only last.ckpt)
    last = run / "checkpoints" / "last.ckpt"
    final, state = load_prompt(ckpt), load_prompt(last)
    assert torch.equal(state.pop("ctx"), final["ctx"])
    assert state == {k: v for k, v in final.items() if k != "ctx"}
    args = [f"ckpt={last}", "dataset=oxford_pets", *eval_overrides]
    from_last = evaluate(compose_config("eval", args, tmp_path / "last"))
    assert from_last["test_acc"] == trained["test_acc"] and from_last["trained_on"] == "oxford_pets"

    # a unified context is rebuilt on another class list: here the last 2 of the 4 classes
    new_cfg = compose_config(
        "eval",
        [f"ckpt={ckpt}", "dataset=oxford_pets", "dataset.subsample=new", *eval_overrides],
        tmp_path / "new",
    )
    new = evaluate(new_cfg)
    assert new["num_classes"] == 2 and new["num_test"] == 8 and new["subsample"] == "new"


def test_class_specific_prompt_only_evaluates_on_its_own_classes(tiny_clip, eval_overrides, tmp_path):
    torch.manual_seed(0)
    names = ["abyssinian", "american_bulldog", "basset_hound", "bengal"]
    save_torch(tmp_path / "prompt.pt", CoOp(tiny_clip, names, n_ctx=4, class_specific=True).prompt_state())
    args = [f"ckpt={tmp_path / 'prompt.pt'}", "dataset=oxford_pets", *eval_overrides]
    assert evaluate(compose_config("eval", args, tmp_path / "own"))["num_classes"] == 4
    with pytest.raises(ValueError, match="class-specific context only applies to the class list"):
        evaluate(compose_config("eval", [*args, "dataset.subsample=base"], tmp_path / "base"))


def test_eval_command_writes_beside_the_prompt(tiny_clip, tmp_path):
    names = ["abyssinian", "american_bulldog", "basset_hound", "bengal"]
    module = CoOp(tiny_clip, names, n_ctx=4)
    save_torch(tmp_path / "prompt.pt", module.prompt_state())
    overrides = [f"ckpt={tmp_path / 'prompt.pt'}", "dataset=oxford_pets", "dataset.subsample=new"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.run.dir == str(tmp_path / "eval" / "oxford_pets_new")
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)  # what Lightning's last.ckpt holds
    save_torch(tmp_path / "checkpoints" / "last.ckpt", checkpoint)
    for ckpt in (tmp_path, tmp_path / "checkpoints" / "last.ckpt"):  # a run's folder or its last.ckpt
        overrides[0] = f"ckpt={ckpt}"
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("eval", overrides=overrides, return_hydra_config=True)
        assert cfg.hydra.run.dir == str(tmp_path / "eval" / "oxford_pets_new")


def test_a_random_weight_prompt_records_its_seed_and_refuses_another(
    tiny_overrides, eval_overrides, tmp_path
):
    """Random weights are a function of the seed: the prompt file records it, src.eval rebuilds the
    backbone from it without seed=, and a seed= that contradicts it is one line, not other numbers."""
    run = tmp_path / "run"
    overrides = ["dataset=oxford_pets", "shots=1", "trainer.max_epochs=1", "seed=2", *tiny_overrides]
    trained = train(make_cfg(overrides, run))
    assert load_prompt(run / "prompt.pt")["backbone_seed"] == 2
    args = [f"ckpt={run}", "dataset=oxford_pets", *eval_overrides]
    same = evaluate(compose_config("eval", args, tmp_path / "same"))
    assert same["test_acc"] == trained["test_acc"] and same["seed"] == 2
    with pytest.raises(ValueError, match=r"^seed=3: .* random weights of seed 2, .* use seed=2 "):
        evaluate(compose_config("eval", [*args, "seed=3"], tmp_path / "other"))
