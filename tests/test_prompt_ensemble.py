"""Ensembles of learned prompts: what each mode averages, and an ensemble of one is its prompt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from src.common.files import save_torch
from src.methods.cocoop import CoCoOp
from src.methods.coop import CoOp
from src.methods.maple import MaPLe
from src.methods.prompt_ensemble import PromptEnsemble
from src.run.config import compose_config
from src.run.evaluation import evaluate
from tests.conftest import CONF_DIR

NAMES = ["abyssinian", "american_bulldog", "basset_hound", "bengal"]


def two_prompts(tiny_clip) -> list[CoOp]:
    torch.manual_seed(0)
    return [CoOp(tiny_clip, NAMES, n_ctx=4), CoOp(tiny_clip, NAMES, n_ctx=2, class_specific=True)]


def test_features_mode_averages_normalised_text_features(tiny_clip):
    members = two_prompts(tiny_clip)
    ensemble = PromptEnsemble(members, "features")
    ensemble.on_test_epoch_start()
    features = torch.randn(5, tiny_clip.model.visual.output_dim)
    with torch.no_grad():
        a, b = (F.normalize(m.text_features(), dim=-1) for m in members)
    mean = F.normalize((a + b) / 2, dim=-1)
    expected = tiny_clip.logit_scale * F.normalize(features, dim=-1) @ mean.t()
    torch.testing.assert_close(ensemble(features), expected)


def test_probs_mode_averages_probabilities(tiny_clip):
    members = two_prompts(tiny_clip)
    ensemble = PromptEnsemble(members, "probs")
    ensemble.on_test_epoch_start()
    features = torch.randn(5, tiny_clip.model.visual.output_dim)
    with torch.no_grad():
        expected = (members[0](features).softmax(-1) + members[1](features).softmax(-1)) / 2
        torch.testing.assert_close(ensemble(features).exp(), expected)
    ensemble.on_test_epoch_end()
    with pytest.raises(ValueError, match="use ensemble=probs"):
        PromptEnsemble([CoCoOp(tiny_clip, NAMES, n_ctx=2)], "features")


def test_a_member_that_prompts_the_image_encoder_gets_the_images(tiny_clip):
    torch.manual_seed(0)
    coop, maple = CoOp(tiny_clip, NAMES, n_ctx=4), MaPLe(tiny_clip, NAMES, n_ctx=2, prompt_depth=2)
    with pytest.raises(ValueError, match=r"\['MaPLe'\] do not have .* use ensemble=probs"):
        PromptEnsemble([coop, maple], "features")
    ensemble = PromptEnsemble([coop, maple], "probs")
    images = torch.randn(3, 3, tiny_clip.image_size, tiny_clip.image_size)
    with torch.no_grad():
        expected = (coop(images).softmax(-1) + maple(images).softmax(-1)) / 2
        torch.testing.assert_close(ensemble(images).exp(), expected)


def test_an_ensemble_of_one_prompt_is_that_prompt(tiny_clip, eval_overrides, tmp_path):
    torch.manual_seed(1)
    save_torch(tmp_path / "prompt.pt", CoOp(tiny_clip, NAMES, n_ctx=4).prompt_state())
    common = ["dataset=oxford_pets", *eval_overrides]
    single = evaluate(compose_config("eval", [f"ckpt={tmp_path / 'prompt.pt'}", *common], tmp_path / "one"))
    for mode in ("features", "probs"):
        args = [f"ckpt=[{tmp_path / 'prompt.pt'}]", f"ensemble={mode}", *common]
        ensemble = evaluate(compose_config("eval", args, tmp_path / mode))
        assert (
            ensemble["test_acc"] == single["test_acc"]
            and ensemble["test_macro_acc"] == single["test_macro_acc"]
        )
        assert ensemble["method"] == "coop_ensemble" and ensemble["ensemble"] == mode
        assert ensemble["members"] == ["coop"] and ensemble["ckpt"] == [str(tmp_path / "prompt.pt")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        args = [f"ckpt=[{tmp_path / 'prompt.pt'},{tmp_path / 'prompt.pt'}]", "dataset=oxford_pets"]
        cfg = compose("eval", overrides=args, return_hydra_config=True)
    assert cfg.hydra.run.dir == str(tmp_path / "eval" / "oxford_pets_ensemble2_features")


def test_report_tables_ensembles_apart_without_missing_seeds(tmp_path):
    from src.report import cells, load_runs
    from tests.test_report import write_run

    for seed in (1, 2):
        write_run(tmp_path, f"coop/seed{seed}", 80.0, seed=seed)
    write_run(tmp_path, "ens", 85.0, seed=0, method="coop_ensemble", ensemble="features")
    table = cells(load_runs(tmp_path)).set_index("variant")
    assert table.loc["coop_ensemble (features)", "mean"] == 85.0
    assert table.loc["coop_ensemble (features)", "missing_seeds"] == ()
