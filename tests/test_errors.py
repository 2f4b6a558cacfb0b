"""Clear errors: a configuration mistake is one line on stderr (`error: ...`, exit status 2) naming
the option and the fix; bugs keep their traceback."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from src.data.datamodule import FewShotDataModule
from src.data.datasets.base import DatasetError
from src.data.datasets.oxford_pets import OxfordPets
from src.methods.coop import CoOp
from src.models.prompt_learner import PromptLearner
from src.run.cli import user_error
from src.run.config import as_hydra_overrides
from src.train import main
from tests.miniature import make_oxford_pets


@pytest.fixture
def train_error(cli, capsys) -> Callable[[list[str]], str]:
    """Runs `python -m src.train <args>` in this process; returns its one error line."""

    def error_line(args: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            cli(main, as_hydra_overrides(args))
        assert exit_info.value.code == 2
        assert "HYDRA_FULL_ERROR" not in os.environ
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, errors
        return errors[0].removeprefix("error: ")

    return error_line


@pytest.mark.parametrize(
    ("override", "valid"),
    [
        ("dataset=nope", "oxford_pets"),
        ("model=nope", "rn50"),
        ("method=nope", "coop"),
        ("ctx=nope", "unified"),
    ],
)
def test_unknown_option_names_the_valid_ones(train_error, override, valid, tmp_path):
    args = [override] if override.startswith("dataset") else ["dataset=oxford_pets", override]
    group, choice = override.split("=")
    message = train_error([*args, f"hydra.run.dir={tmp_path}"])
    assert message.startswith(f"{group}={choice}: unknown {group} option; choose one of: ")
    assert valid in message.split("choose one of: ")[1].split(", ")


def test_a_missing_dataset_names_the_choices(train_error, tmp_path):
    message = train_error(["model=tiny", f"hydra.run.dir={tmp_path}"])
    assert message.startswith("dataset is required; choose one of: ") and "textile" in message


def test_context_length_below_one(train_error, tiny_overrides, tmp_path):
    message = train_error(
        ["dataset=oxford_pets", "ctx.n_ctx=0", *tiny_overrides, f"hydra.run.dir={tmp_path}"]
    )
    assert message == "ctx.n_ctx=0: the context needs at least 1 vector"


def test_an_unwritable_run_folder(train_error, tmp_path):
    (tmp_path / "a_file").write_text("")
    message = train_error(
        ["dataset=oxford_pets", "model=tiny", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"]
    )
    assert str(tmp_path / "a_file") in message and "hydra.run.dir=" in message


def test_a_dataset_without_test_images(train_error, tiny_overrides, tmp_path):
    make_oxford_pets(tmp_path / "data", per_class=(4, 1, 0))
    args = ["dataset=oxford_pets", *tiny_overrides, f"paths.data_dir={tmp_path / 'data'}"]
    message = train_error([*args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert message.endswith("oxford_pets: no test images; check the split's test list and its images")
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training


@pytest.mark.usefixtures("offline_without_weights")
def test_every_cheap_mistake_is_reported_at_once_before_any_weights_load(cli, capsys, tmp_path):
    """A first command without network, data or a fitting run folder: all its mistakes in one go,
    in seconds (the hub is not tried: HF_HUB_OFFLINE), and the folder is not claimed."""
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    run.mkdir()
    (run / "fingerprint.json").write_text(json.dumps({"config": {"seed": 7}}))
    args = [
        "dataset=oxford_pets",
        "ctx=class_specific",
        "ctx.n_ctx=0",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"model.cache_dir={tmp_path / 'weights'}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli(main, as_hydra_overrides([*args, "shots=8", f"hydra.run.dir={run}"]))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, errors
    assert errors[0].startswith(f"error: {run} holds a run with another configuration (")
    assert errors[1] == "error: ctx.n_ctx=0: the context needs at least 1 vector"
    assert errors[2].startswith("error: model.pretrained=openai: the RN50-quickgelu weights are not in ")
    assert "(HF_HUB_OFFLINE=1); give a local file with model.pretrained=<file>" in errors[2]
    assert errors[3].startswith(f"error: dataset folder {tmp_path / 'data' / 'oxford_pets'} not found")
    assert json.loads((run / "fingerprint.json").read_text()) == {"config": {"seed": 7}}

    with pytest.raises(SystemExit):  # one mistake left: reported as it is; the new folder stays unclaimed
        cli(main, [*args[:1], *args[3:], "model=tiny", f"hydra.run.dir={fresh}"])
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: dataset folder ") and not (fresh / "fingerprint.json").exists()


def test_a_dataset_without_training_images(tmp_path):
    make_oxford_pets(tmp_path, per_class=(0, 1, 2))
    datamodule = FewShotDataModule(OxfordPets(tmp_path / "oxford_pets"), shots=2, seed=1, num_workers=0)
    with pytest.raises(DatasetError, match="has no training images") as error:
        datamodule.setup("fit")
    assert "\n" not in str(error.value)


def test_class_specific_context_from_words_starts_every_class_from_them(tiny_clip, caplog):
    """The reference silently drops class-specific when init words are given; here every class
    gets its own context, each starting from the words, and the log says so."""
    with caplog.at_level(logging.INFO, logger="src.models.prompt_learner"):
        learner = PromptLearner(
            ["cat", "dog", "bird"],
            tiny_clip.token_embedding,
            tiny_clip.tokenize,
            ctx_init="a photo of a",
            class_specific=True,
        )
    assert "class-specific context: every class starts from 'a photo of a'" in caplog.text
    words = tiny_clip.token_embedding(tiny_clip.tokenize(["a photo of a"]))[0, 1:5]
    assert learner.ctx.shape == (3, 4, words.shape[-1]) and learner.n_ctx == 4
    for context in learner.ctx:
        assert torch.equal(context, words)


def test_a_prompt_from_another_backbone_or_class_list(tiny_clip):
    state = CoOp(tiny_clip, ["cat", "dog"], n_ctx=2).prompt_state()
    with pytest.raises(ValueError) as error:
        CoOp.from_prompt({**state, "backbone": "RN50-quickgelu", "pretrained": "openai"}, tiny_clip)
    assert "\n" not in str(error.value)
    assert "learned on RN50-quickgelu" in str(error.value)
    assert "use model.name=RN50-quickgelu model.pretrained=openai" in str(error.value)
    specific = CoOp(tiny_clip, ["cat", "dog"], n_ctx=2, class_specific=True).prompt_state()
    with pytest.raises(ValueError, match="class-specific context only applies to the class list") as error:
        CoOp.from_prompt(specific, tiny_clip, classnames=["car", "plane", "ship"])
    assert "\n" not in str(error.value)


def _raise(error: Exception) -> None:
    raise error


def test_bugs_keep_their_traceback():
    for bug in (KeyError("x"), ValueError("a library's message")):  # not raised in src/
        with pytest.raises(type(bug)) as raised:
            _raise(bug)
        assert user_error(raised.value) is None
    with pytest.raises(DatasetError) as deliberate:  # the project's own classes are messages wherever raised
        _raise(DatasetError("data/pets not found: point paths.data_dir at it"))
    assert user_error(deliberate.value) == "data/pets not found: point paths.data_dir at it"
    with pytest.raises(FileNotFoundError) as missing:
        Path("/nonexistent/file").read_text()
    assert user_error(missing.value) == "/nonexistent/file: No such file or directory"
