"""Prompts the original repositories publish (Dassl checkpoints): read without running pickled code,
rebuilt as this project's methods with the original models' logits, and this project's prompts
written back as checkpoints the original code loads.

tests/fixtures/dassl/ was written by the original code itself (experiments/parity/dassl_checkpoints.py:
CoOp's, CoCoOp's, KgCoOp's and ProGrad's prompt learners on the tiny `coop-tiny-openai` of seed 0,
two SGD steps, Dassl's save_checkpoint; manifest.json has the commits; and by
experiments/parity/promptsrc.py: PromptSRC's whole model after one step, Dassl's save_model), with
the logits of the original models.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from src.common.dassl_checkpoint import read_dassl, write_dassl
from src.eval import main as eval_main
from src.export import export
from src.methods.base import method_from_prompt
from src.methods.maple import MaPLe
from src.methods.promptsrc import PromptSRC
from src.methods.released import dassl_state, prompt_from_dassl
from src.models.clip import FrozenCLIP
from src.run.config import compose_config
from src.run.evaluation import evaluate
from src.run.saved_prompt import as_prompt
from src.run.training import train
from tests.conftest import make_cfg, run_clip

FIXTURES = Path(__file__).parent / "fixtures" / "dassl"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CLASSNAMES = MANIFEST["classnames"]


@pytest.fixture(scope="module")
def official_clip() -> FrozenCLIP:
    """The backbone the fixtures were learned on (what `model=` names for them)."""
    torch.manual_seed(MANIFEST["backbone_seed"])
    return FrozenCLIP(MANIFEST["backbone"], None)


def images() -> torch.Tensor:
    spec = MANIFEST["images"]
    return torch.randn(spec["n"], *spec["shape"], generator=torch.Generator().manual_seed(spec["seed"]))


def logits(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(batch)


PETS = "a photo of a {}, a type of pet."  # CoOp's Oxford Pets template
PROGRAD_PETS = "a type of pet, a photo of a {}."  # ProGrad's (conf/method/prograd.yaml, as its code)


@pytest.mark.parametrize(
    ("method", "given", "template", "n_ctx"),
    [
        ("coop", "coop", PETS, 4),
        ("cocoop", None, PETS, 4),
        ("kgcoop", None, PETS, 4),
        ("prograd", "prograd", PROGRAD_PETS, 16),
    ],
)
def test_official_checkpoints_give_the_official_logits(official_clip, method, given, template, n_ctx):
    checkpoint = read_dassl(FIXTURES / method)  # the output folder: its prompt_learner/model.pth.tar-2
    assert checkpoint["epoch"] == 2 and Path(checkpoint["file"]).name == "model.pth.tar-2"
    # the stepped SGD and schedule are records of their attributes, not the classes
    successor = checkpoint["scheduler"]["successor"]
    assert successor.pickled_class == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert checkpoint["optimizer"]["state"][0]["momentum_buffer"].abs().sum() > 0
    state = prompt_from_dassl(checkpoint, official_clip, CLASSNAMES, given, template)
    assert state["method"] == method and state["classnames"] == CLASSNAMES and state["n_ctx"] == n_ctx
    module = method_from_prompt(state, official_clip, CLASSNAMES)
    expected = torch.load(FIXTURES / method / "logits.pt", weights_only=True)
    got = logits(module, images())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (expected[:, 0] - expected[:, 1]).abs().max() > 1e-2  # the classes' logits differ
    # without a dataset, the classes it was trained on are read from its saved tokens
    trained = prompt_from_dassl(checkpoint, official_clip, None, given, template)["classnames"]
    assert trained == ["red fox", "golden retriever"]


def test_prograds_checkpoint_needs_the_template_that_made_its_words(official_clip, tmp_path):
    """ProGrad's Oxford Pets prompts learn 16 vectors (8 zeros, then "a type of pet , a photo of")
    and keep "a" as text: rebuilt with its template for the dataset, which `method=prograd
    dataset=oxford_pets` gives the commands; another template is one line."""
    checkpoint = read_dassl(FIXTURES / "prograd")
    with pytest.raises(ValueError, match=r"keep the words 'a' after the 16 learned vectors, which ProGrad's"):
        prompt_from_dassl(checkpoint, official_clip, CLASSNAMES, "prograd", "a photo of a {}.")
    cfg = compose_config("eval", ["method=prograd", "dataset=oxford_pets", f"ckpt={FIXTURES / 'prograd'}"])
    assert as_prompt(checkpoint, official_clip, CLASSNAMES, cfg)["hparams"]["template"] == PROGRAD_PETS


def test_keys_that_do_not_tell_the_method_and_another_backbone_are_one_line(official_clip):
    checkpoint = read_dassl(FIXTURES / "coop")
    with pytest.raises(ValueError, match="CoOp and ProGrad alike .* method=coop or method=prograd$"):
        prompt_from_dassl(checkpoint, official_clip, CLASSNAMES)
    with pytest.raises(ValueError, match=r"not maple's: give method=coop\|prograd\|kgcoop"):
        prompt_from_dassl(checkpoint, official_clip, CLASSNAMES, "maple")
    with pytest.raises(ValueError, match="not token embeddings of coop-tiny: .*another backbone"):
        prompt_from_dassl(checkpoint, run_clip(seed=2), CLASSNAMES, "coop")  # other random weights


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_file_with_code_is_refused_in_one_line_and_never_runs(cli, capsys, tmp_path):
    marker = tmp_path / "ran"
    file = tmp_path / "out" / "prompt_learner" / "model.pth.tar-5"
    file.parent.mkdir(parents=True)
    with file.open("wb") as f:
        torch.save({"state_dict": {"ctx": torch.zeros(4, 64)}, "epoch": 5, "scheduler": Payload(marker)}, f)
    with pytest.raises(ValueError, match=rf"^ckpt={file}: refused, not unpickled: it names posix.system"):
        read_dassl(file)
    with pytest.raises(SystemExit):
        cli(eval_main, [f"ckpt={tmp_path / 'out'}", "dataset=oxford_pets", "model=tiny"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: ckpt={file}: refused"), errors
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(1)) == 1  # (pickle itself is untouched)


def test_a_prompt_trained_here_round_trips_through_a_dassl_checkpoint(
    tiny_overrides, eval_overrides, tmp_path
):
    run = tmp_path / "run"
    trained = train(
        make_cfg(["dataset=oxford_pets", "shots=1", "trainer.max_epochs=1", *tiny_overrides], run)
    )
    file = export(compose_config("export", [f"ckpt={run}", "format=dassl"]))
    assert file == run / "dassl" / "prompt_learner" / "model.pth.tar-1"
    assert (file.parent / "checkpoint").read_text() == "model.pth.tar-1\n"

    # the original code's load_model: Dassl's load_checkpoint (torch.load, weights-only by default
    # since torch 2.6), token_prefix and token_suffix deleted, load_state_dict(strict=False) into its
    # prompt learner, whose tensors are those of the original's own file
    loaded = torch.load(file, map_location="cpu")
    state_dict = loaded["state_dict"]
    assert loaded["epoch"] == 1 and loaded["val_result"] is None
    official = read_dassl(FIXTURES / "coop")["state_dict"]
    assert set(state_dict) == set(official)
    length = [1 + sd["ctx"].shape[-2] + sd["token_suffix"].shape[1] for sd in (state_dict, official)]
    assert length == [77, 77]  # SOS, the context, the rest: the text encoder's whole length
    del state_dict["token_prefix"], state_dict["token_suffix"]
    learner = nn.Module()
    learner.ctx = nn.Parameter(torch.zeros(16, 64))
    result = learner.load_state_dict(state_dict, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(learner.ctx, torch.load(run / "prompt.pt", weights_only=True)["ctx"])

    # read back, it is the same prompt: the same test (the file names no backbone: model=)
    args = [f"ckpt={run / 'dassl'}", "dataset=oxford_pets", "model=tiny", *eval_overrides]
    cfg = compose_config("eval", args, tmp_path / "eval")
    again = evaluate(cfg)
    assert again["method"] == "coop" and again["n_ctx"] == 16
    assert (again["test_acc"], again["test_macro_acc"]) == (trained["test_acc"], trained["test_macro_acc"])
    with pytest.raises(ValueError, match="does not name the backbone .* model="):
        _ = compose_config("eval", args[:2] + eval_overrides, tmp_path / "x").model.name


@pytest.mark.parametrize(
    ("cls", "options", "keys"),
    [
        (
            MaPLe,
            {"prompt_depth": 2},
            {
                "prompt_learner.ctx",
                "prompt_learner.proj.weight",
                "prompt_learner.compound_prompts_text.0",
                "prompt_learner.compound_prompt_projections.0.bias",
            },
        ),
        (
            PromptSRC,
            {"prompt_depth_text": 2, "prompt_depth_vision": 2, "n_ctx_vision": 2},
            {
                "prompt_learner.ctx",
                "text_encoder.transformer.resblocks.1.VPT_shallow",
                "image_encoder.VPT",
                "image_encoder.transformer.resblocks.1.VPT_shallow",
            },
        ),
    ],
)
def test_maple_and_promptsrc_prompts_round_trip_under_the_original_names(
    tiny_clip, tmp_path, cls, options, keys
):
    torch.manual_seed(3)
    names = ["red fox", "dog", "cat"]
    module = cls(tiny_clip, names, **options)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    model, state_dict = dassl_state(module)
    assert keys <= set(state_dict)
    write_dassl(tmp_path, model, state_dict, 5, method=module.name)  # as src.export records it
    state = prompt_from_dassl(read_dassl(tmp_path), tiny_clip, names)
    assert state["method"] == cls.name
    if cls is MaPLe:  # its default learns "a photo" and keeps "of a": read from the saved tokens
        assert state["ctx_init"] == "a photo of a" and state["n_ctx"] == 2
    again = method_from_prompt(state, tiny_clip, names)
    batch = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(again, batch), logits(module, batch))


def test_promptsrcs_official_checkpoint_gives_the_official_logits(tiny_clip):
    """tests/fixtures/dassl/promptsrc: PromptSRC's model after one official step (muzairkhattak/
    PromptSRC, experiments/parity/promptsrc.py: the tiny CLIP of tests/fixtures/parity/promptsrc.pt),
    written by Dassl's own save_model, the whole model as the official releases hold it: its deep
    text and image prompts are read from the encoders' keys, the frozen CLIP's tensors left."""
    from tests.test_parity import images_of

    fixture = torch.load(Path(__file__).parent / "fixtures/parity/promptsrc.pt", weights_only=True)
    checkpoint = read_dassl(FIXTURES / "promptsrc")
    assert Path(checkpoint["file"]).parent.name == "VLPromptLearner" and checkpoint["epoch"] == 1
    assert any(key.startswith("image_encoder.") for key in checkpoint["state_dict"])  # the frozen CLIP too
    state = prompt_from_dassl(checkpoint, tiny_clip, fixture["classnames"])
    assert state["method"] == "promptsrc"
    assert (state["hparams"]["prompt_depth_text"], state["hparams"]["prompt_depth_vision"]) == (2, 2)
    module = method_from_prompt(state, tiny_clip, fixture["classnames"])
    expected = torch.load(FIXTURES / "promptsrc" / "logits.pt", weights_only=True)
    torch.testing.assert_close(logits(module, images_of(fixture)), expected, atol=1e-5, rtol=1e-5)
