"""A corrected mistake always just runs: every check that can fail on the configuration or the data
runs before the run folder is claimed, so the command corrected as the error line says trains in
the same folder; the fixes that error lines print work when pasted as printed; the tools write
nothing before their checks pass; a sweep names its failed runs and keeps the others' results."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from src import eval as eval_command
from src import train as train_command
from src.common.files import save_torch
from src.methods.coop import CoOp
from src.run.config import as_hydra_overrides
from src.run.training import train
from tests.conftest import make_cfg
from tests.miniature import make_oxford_pets, write_image

Command = Callable[..., list[str]]


@pytest.fixture
def command(cli, capsys) -> Command:
    """`command(main, args)` runs `python -m src.<main> <args>` in this process; returns its error
    lines (none when it succeeded), after checking that there is nothing else on stderr that would
    precede them (Hydra's "Error executing job" line, a traceback)."""

    def errors(main, args: list[str]) -> list[str]:
        try:
            cli(main, as_hydra_overrides(args))
        except SystemExit as exit_info:
            assert exit_info.code == 2
        err = capsys.readouterr().err
        assert "Error executing job" not in err and "Traceback" not in err, err
        return [line.removeprefix("error: ") for line in err.splitlines() if line.startswith("error: ")]

    return errors


def printed_fix(message: str) -> list[str]:
    """The overrides after the message's last ': use ' (the first choice), as a shell splits them."""
    fix = message.rsplit(": use ", 1)[1]
    return shlex.split(re.split(r", | or | \(", fix)[0])


def pasted(args: list[str], fix: list[str]) -> list[str]:
    """`args` with `fix` pasted: the overrides of the same keys replaced."""
    keys = {item.split("=", 1)[0] for item in fix}
    return [item for item in args if item.split("=", 1)[0] not in keys] + fix


def trains(command: Command, args: list[str], run: Path) -> None:
    assert command(train_command.main, args) == []
    assert json.loads((run / "results.json").read_text())["num_test"] > 0


@pytest.fixture
def base_args(tiny_overrides) -> Callable[[Path], list[str]]:
    def args(run: Path) -> list[str]:
        fast = ["shots=1", "trainer.max_epochs=1"]
        return ["dataset=oxford_pets", *tiny_overrides, *fast, f"hydra.run.dir={run}"]

    return args


@pytest.fixture
def own_data(tmp_path) -> Path:
    """A miniature oxford_pets of this test's own, to break (the session's is shared)."""
    make_oxford_pets(tmp_path / "own")
    return tmp_path / "own"


@pytest.mark.parametrize(
    ("mistakes", "correction", "culprits"),
    [
        (["data.label_noise=1.5"], ["data.label_noise=0.5"], ["data.label_noise=1.5"]),
        (["method=maple"], None, ["method.module.prompt_depth=9"]),  # the tiny CLIP has 2 blocks
        # the methods' own options against the backbone (Method.check_config), fixes pasted
        (["method=ivlp"], None, ["prompt_depth_text=9, method.module.prompt_depth_vision=9"]),
        (["method=mmrl", "method.module.rep_dim=16"], None, ["method.module.rep_layers=[6, 7, 8"]),
        (["method=clip_lora", "method.module.layers=[5]"], None, ["method.module.layers=[5]"]),
        (["method=dept", "method/base=maple"], None, ["method.module.prompt_depth=9"]),
        (["method=dept", "method.module.cat_weight=2"], ["method.module.cat_weight=0.7"], ["cat_weight=2"]),
        (["method=kgcoop", "method.module.template=a"], ["method.module.template='{}.'"], ["template="]),
        (
            ["method=promptsrc", "method.module.prompt_depth_text=1", "method.module.prompt_depth_vision=1"]
            + ["method.module.gpa_std=0"],
            ["method.module.gpa_std=1"],
            ["method.module.gpa_std=0"],
        ),
        (["data.fewshot_file=/nonexistent/fewshot.json"], ["data.fewshot_file=null"], ["data.fewshot_file="]),
        pytest.param(
            ["trainer=gpu"],
            None,
            ["trainer.accelerator=gpu"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there"),
        ),
        # options of a few choices, several at once: a line each (in the order of the checks),
        # each fix pasted
        (
            ["baseline=zero", "ctx.class_token_position=up", "model.text_path=fast", "data.train_augment=x"],
            None,
            ["baseline='zero'", "position='up'", "model.text_path='fast'", "data.train_augment='x'"],
        ),
        (["ctx.init_count=letters", "dataset.subsample=novel"], None, ["init_count=", "subsample="]),
        (
            ["method=cocoop", "ctx=class_specific", "data.batch_size=4", "data.fewshot_sampler=x"],
            None,
            ["method=cocoop has one context", "data.fewshot_sampler='x'"],
        ),
    ],
)
def test_option_mistakes_then_their_correction_train_in_the_same_folder(
    command, base_args, tmp_path, mistakes, correction, culprits
):
    """`correction` None: the fixes the error lines print, pasted as printed."""
    run = tmp_path / "run"
    args = [*base_args(run), *mistakes]
    errors = command(train_command.main, args)
    assert len(errors) == len(culprits)
    for error, culprit in zip(errors, culprits, strict=True):
        assert culprit in error
    assert not (run / "fingerprint.json").exists()  # the folder is not claimed
    for fix in [correction] if correction else [printed_fix(error) for error in errors]:
        args = pasted(args, fix)
    trains(command, args, run)


def test_a_data_mistake_then_its_correction_trains_in_the_same_folder(command, base_args, own_data, tmp_path):
    """The data is corrected, the command stays: a split file whose labels count from 1 (the error
    names the file), the reference's few-shot pickle that is damaged."""
    run = tmp_path / "run"
    args = [*base_args(run), f"paths.data_dir={own_data}"]
    split = own_data / "oxford_pets" / "split_zhou_OxfordPets.json"
    good = split.read_text()
    rows = json.loads(good)
    split.write_text(json.dumps({key: [[p, label + 1, n] for p, label, n in rows[key]] for key in rows}))
    (error,) = command(train_command.main, args)
    assert error.startswith(f"{split}: labels must be 0..3, one per class; found [1, 2, 3, 4]")
    split.write_text(good)

    pickle = own_data / "oxford_pets" / "split_fewshot" / "shot_1-seed_1.pkl"
    pickle.parent.mkdir()
    pickle.write_bytes(b"\x80\x04 damaged")
    (error,) = command(train_command.main, args)
    assert error.startswith(f"{pickle} is not a few-shot file of the reference")
    assert not (run / "fingerprint.json").exists()
    pickle.unlink()
    trains(command, args, run)


def test_an_empty_class_folder_and_a_csv_typo(command, tiny_overrides, tmp_path):
    """Your own data: a class folder without images, a label mistyped in the test CSV; both are
    classes without training images, found before the folder is claimed."""
    images = tmp_path / "images"
    for label, name in enumerate(["cat", "dog"]):
        for index in range(6):
            write_image(images / name / f"{index}.jpg", label, index)
    (images / "empty").mkdir()
    run = tmp_path / "folder_run"
    args = ["dataset=folder", f"dataset.root={images}", *tiny_overrides, "shots=1", "trainer.max_epochs=1"]
    (error,) = command(train_command.main, [*args, f"hydra.run.dir={run}"])
    assert "no training images for classes ['empty']" in error
    assert not (run / "fingerprint.json").exists()
    (images / "empty").rmdir()
    trains(command, [*args, f"hydra.run.dir={run}"], run)

    (tmp_path / "train.csv").write_text(
        "path,label\n" + "".join(f"images/{n}/{i}.jpg,{n}\n" for n in ("cat", "dog") for i in range(4))
    )
    test = tmp_path / "test.csv"
    test.write_text("path,label\nimages/cat/4.jpg,cta\nimages/dog/4.jpg,dog\n")
    run = tmp_path / "csv_run"
    args = [
        "dataset=csv",
        f"dataset.train={tmp_path / 'train.csv'}",
        f"dataset.test={test}",
        *tiny_overrides,
        "shots=1",
        "trainer.max_epochs=1",
        f"hydra.run.dir={run}",
    ]
    (error,) = command(train_command.main, args)
    assert "no training images for classes ['cta']" in error
    test.write_text("path,label\nimages/cat/4.jpg,cat\nimages/dog/4.jpg,dog\n")
    trains(command, args, run)


def test_an_unwritable_feature_cache_is_found_before_training(command, base_args, tmp_path):
    run = tmp_path / "run"
    (tmp_path / "a_file").write_text("")
    blocked = tmp_path / "a_file" / "cache"
    (error,) = command(train_command.main, [*base_args(run), f"paths.cache_dir={blocked}"])
    assert error.startswith(f"paths.cache_dir={blocked} (the feature cache) is not writable (")
    assert "COOP_CACHE=<folder>" in error and "data.cache_features=false" in error
    assert not (run / "fingerprint.json").exists()
    trains(command, [*base_args(run), f"paths.cache_dir={tmp_path / 'cache'}"], run)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, data_dir, cache_dir) -> Path:
    """A run folder with its last.ckpt and no results.json, as a killed run leaves it."""
    run = tmp_path_factory.mktemp("interrupted")
    args = [
        "dataset=oxford_pets",
        "model=tiny",
        "trainer=cpu",
        f"paths.data_dir={data_dir}",
        f"paths.cache_dir={cache_dir}",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
        *DAMAGED_RUN,
    ]
    train(make_cfg(args, run))
    (run / "results.json").unlink()
    return run


DAMAGED_RUN = ["shots=1", "trainer.max_epochs=1"]


@pytest.mark.parametrize("damage", ["truncated", "pickled code", "not a checkpoint"])
def test_a_damaged_last_checkpoint_is_one_line_naming_it(
    command, tiny_overrides, interrupted_run, tmp_path, damage
):
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    last = run / "checkpoints" / "last.ckpt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:200])
    elif damage == "pickled code":
        torch.save({"epoch": 1, "state_dict": {}, "code": Path("runs code")}, last)
    else:
        torch.save({"weights": torch.ones(2)}, last)
    args = ["dataset=oxford_pets", *tiny_overrides, *DAMAGED_RUN, f"hydra.run.dir={run}"]
    (error,) = command(train_command.main, args)
    assert error.startswith(f"{last} ")
    assert error.endswith(
        "delete it to start the run over, or keep this folder as it is and give the run another one "
        "with hydra.run.dir=<folder>"
    )
    assert "weights_only" not in error
    if damage == "truncated":
        last.unlink()
        trains(command, args, run)


def test_src_eval_pasted_fixes_and_nothing_written_before_its_checks(
    command, base_args, eval_overrides, tmp_path
):
    run = tmp_path / "run"
    trains(command, [*base_args(run), "ctx=class_specific"], run)
    eval_args = [f"ckpt={run}", "dataset=oxford_pets", *eval_overrides]

    typo = tmp_path / "rn" / "prompt.pt"
    (error,) = command(eval_command.main, [f"ckpt={typo}", *eval_args[1:]])
    assert error.startswith(f"ckpt={typo}: no such file or folder")
    assert not (tmp_path / "rn").exists()  # Hydra made no folder of the mistyped path

    (error,) = command(eval_command.main, [*eval_args, "model=tiny_pretrained"])
    assert error.endswith("use model.name=coop-tiny model.pretrained=null")
    assert command(eval_command.main, [*eval_args, "model=tiny_pretrained", *printed_fix(error)]) == []
    assert (run / "eval" / "oxford_pets" / "results.json").is_file()

    (error,) = command(eval_command.main, [*eval_args, "dataset.subsample=base"])
    assert "the class list it was trained on (4 classes of oxford_pets)" in error


def test_a_class_specific_prompt_names_the_base_classes_it_was_trained_on(tiny_clip, tmp_path):
    from src.common.prompt_file import load_prompt

    module = CoOp(tiny_clip, ["a", "b"], n_ctx=2, class_specific=True)
    save_torch(tmp_path / "prompt.pt", module.prompt_state())
    config = {"dataset.name": "dtd", "dataset.subsample": "base"}
    (tmp_path / "fingerprint.json").write_text(json.dumps({"config": config}))
    with pytest.raises(ValueError, match=r"\(2 classes of dtd, dataset.subsample=base\)"):
        CoOp.from_prompt(load_prompt(tmp_path / "prompt.pt"), tiny_clip, ["c", "d"])


def test_a_sweep_names_its_failed_run_once_and_keeps_the_others(command, tiny_overrides, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "dataset=oxford_pets",
        *tiny_overrides,
        "shots=1",
        "trainer.max_epochs=1",
        "data.fewshot_sampler=reference,random,sorted",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${data.fewshot_sampler}",
    ]
    errors = command(train_command.main, args)
    assert errors == [
        "run #1 (data.fewshot_sampler=random): data.fewshot_sampler='random': use "
        "data.fewshot_sampler=reference, data.fewshot_sampler=sorted or data.fewshot_sampler=clip_lora",
        "1 of 3 runs failed; the other 2 kept their results",
    ]
    assert {p.parent.name for p in sweep.glob("*/results.json")} == {"reference", "sorted"}


def test_class_names_that_become_one_prompt_or_overflow_it_are_refused_before_the_claim(
    command, tiny_overrides, tmp_path
):
    """Inputs are taken as given or refused: two classes whose names become the same prompt words,
    and a class whose prompt would be cut at the text encoder's 77 tokens, each one line naming the
    class, before the run folder is claimed; the corrected data trains there."""
    root = tmp_path / "folder"
    long = " ".join(["a"] * 60)  # 60 tokens + 16 context vectors + start, period, end > 77
    for label, name in enumerate(("Red_Fox", "red  fox", "cat")):
        for index in range(2):
            write_image(root / name / f"{index}.jpg", label, index)
    run = tmp_path / "run"
    args = ["dataset=folder", f"dataset.root={root}", *tiny_overrides, "shots=1", "trainer.max_epochs=1"]
    args.append(f"hydra.run.dir={run}")
    (error,) = command(train_command.main, args)
    assert "'Red_Fox' (label 0) and 'red  fox' (label 2) become the same prompt words ('red fox')" in error
    assert not (run / "fingerprint.json").exists()
    (root / "red  fox").rename(root / long)
    (error,) = command(train_command.main, args)
    assert f"class '{long}': its prompt" in error and "fewer context vectors (ctx.n_ctx=16 now)" in error
    assert not (run / "fingerprint.json").exists()
    trains(command, [*args, "ctx.n_ctx=4"], run)


def test_a_run_resumed_on_changed_data_is_refused_and_keeps_its_record(
    command, base_args, own_data, tmp_path
):
    """A run stopped after its last checkpoint, then its data changed (a class renamed in the split
    file, images swapped): resuming would train on other images; one line says what changed and how
    to start over, and its fewshot.json stays the record of what it trained on."""
    run = tmp_path / "run"
    args = [*base_args(run), f"paths.data_dir={own_data}", "trainer.max_epochs=2"]
    trains(command, args, run)
    (run / "results.json").unlink()  # as a run killed after its last checkpoint
    record = (run / "fewshot.json").read_bytes()
    split = own_data / "oxford_pets" / "split_zhou_OxfordPets.json"
    rows = json.loads(split.read_text())
    renamed = {key: [[p, label, "lynx" if label == 0 else n] for p, label, n in rows[key]] for key in rows}
    split.write_text(json.dumps(renamed))
    (error,) = command(train_command.main, args)
    assert error.startswith(f"{run / 'fewshot.json'}: this run started on other train images")
    assert "class 0 " in error and f"delete {run}" in error
    assert (run / "fewshot.json").read_bytes() == record
    split.write_text(json.dumps(rows))  # the data it started on: it continues
    trains(command, args, run)
