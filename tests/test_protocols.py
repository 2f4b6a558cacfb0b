"""The protocols: base/new class split and H, domain generalisation, cross-dataset, base-to-new."""

from __future__ import annotations

import json
import math

import pytest

from src.data.samples import Sample, Splits
from src.data.subsample import subsample_classes
from src.protocols import base_to_new_summary, main
from src.run.training import train
from tests.conftest import make_cfg
from tests.miniature import LAYOUTS


def splits_of(n_classes: int) -> Splits:
    names = [f"class{i}" for i in range(n_classes)]
    items = [Sample(f"/{split}/{i}.jpg", i, names[i]) for i in range(n_classes) for split in ("a", "b")]
    return Splits(items, items[:2], items, names)


def test_base_is_the_first_half_of_the_sorted_labels_new_the_rest():
    splits = splits_of(5)
    base, new = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    assert base.classnames == ["class0", "class1", "class2"] and new.classnames == ["class3", "class4"]
    assert [(s.path, s.label) for s in new.train] == [
        ("/a/3.jpg", 0),
        ("/b/3.jpg", 0),
        ("/a/4.jpg", 1),
        ("/b/4.jpg", 1),
    ]
    assert {s.label for s in base.test} == {0, 1, 2} and base.val == splits.val
    assert subsample_classes(splits, "all") is splits
    assert len(subsample_classes(splits_of(4), "base").classnames) == 2
    with pytest.raises(ValueError, match="dataset.subsample=new keeps 1 of 3 classes"):
        subsample_classes(splits_of(3), "new")
    with pytest.raises(ValueError, match="use dataset.subsample=all, dataset.subsample=base or dataset"):
        subsample_classes(splits, "novel")


def test_h_is_the_harmonic_mean_of_the_per_dataset_means():
    rows = [
        {"dataset": "a", "seed": 1, "base": 80.0, "new": 60.0},
        {"dataset": "a", "seed": 2, "base": 90.0, "new": 70.0},
        {"dataset": "b", "seed": 1, "base": 50.0, "new": 100.0},
    ]
    summary = base_to_new_summary(rows)
    a, b = summary["datasets"]["a"], summary["datasets"]["b"]
    assert (a["base"], a["new"], a["seeds"]) == (85.0, 65.0, 2)
    assert a["H"] == pytest.approx(2 * 85 * 65 / 150) and b["H"] == pytest.approx(2 * 50 * 100 / 150)
    average = summary["average"]
    assert (average["base"], average["new"]) == (67.5, 82.5)
    assert average["H"] == pytest.approx(2 * 67.5 * 82.5 / 150)  # of the averages, not the mean of H
    # the CoOp row of the CoCoOp paper's 11-dataset average
    reported = base_to_new_summary([{"dataset": "avg", "seed": 1, "base": 82.69, "new": 63.22}])
    assert math.isclose(reported["average"]["H"], 71.66, abs_tol=0.01)


@pytest.fixture(scope="module")
def all_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("all")
    for name in (
        "imagenet",
        "imagenetv2",
        "imagenet_sketch",
        "imagenet_a",
        "imagenet_r",
        "dtd",
        "oxford_pets",
    ):
        LAYOUTS[name](root)
    return root


def test_transfer_protocols_from_an_imagenet_prompt(all_data, cache_dir, tmp_path):
    common = [
        "trainer=cpu",
        f"paths.data_dir={all_data}",
        f"paths.cache_dir={cache_dir}",
        "data.num_workers=0",
    ]
    run = tmp_path / "imagenet"
    source = train(
        make_cfg(["dataset=imagenet", "model=tiny", "shots=1", "trainer.max_epochs=1", *common], run)
    )
    ckpt = f"ckpt={run / 'prompt.pt'}"

    summary = main(["domain_generalization", ckpt, *common])
    targets = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert list(summary["targets"]) == targets
    assert summary["source"] == {"dataset": "imagenet", "test_acc": source["test_acc"]}
    assert json.loads((run / "domain_generalization.json").read_text()) == summary
    evaluated = {t: json.loads((run / "eval" / t / "results.json").read_text()) for t in targets}
    assert {t: r["test_acc"] for t, r in evaluated.items()} == summary["targets"]
    assert summary["average"] == pytest.approx(sum(summary["targets"].values()) / 4)
    # imagenet_a / imagenet_r: the context is rebuilt on the classes present only
    assert evaluated["imagenet_a"]["num_classes"] == 3 and evaluated["imagenetv2"]["num_classes"] == 6

    cross = main(["cross_dataset", ckpt, "targets=dtd,oxford_pets", *common])
    assert list(cross["targets"]) == ["dtd", "oxford_pets"]
    assert json.loads((run / "eval" / "oxford_pets" / "results.json").read_text())["trained_on"] == "imagenet"


@pytest.mark.parametrize(
    ("method", "extra", "name"),
    [
        ("coop", [], "coop"),
        ("zeroshot", [], "zeroshot"),
        ("maple", ["method.module.prompt_depth=2"], "maple"),
        ("promptsrc", [f"method.module.prompt_depth_{tower}=2" for tower in ("text", "vision")], "promptsrc"),
        ("mmrl", ["method.module.rep_layers=[2]", "method.module.rep_dim=16"], "mmrl"),
        ("clip_lora", [], "clip_lora"),
        ("dept", ["method/base=coop"], "coop_dept"),
    ],
)
def test_base_to_new_trains_on_base_and_tests_on_new(all_data, cache_dir, tmp_path, method, extra, name):
    args = [
        "datasets=oxford_pets",
        "seeds=1",
        f"out={tmp_path}",
        f"method={method}",
        "model=tiny",
        "trainer=cpu",
    ]
    overrides = [f"paths.data_dir={all_data}", f"paths.cache_dir={cache_dir}", "data.num_workers=0"]
    summary = main(["base_to_new", *args, *overrides, "shots=1", "trainer.max_epochs=1", *extra])
    run = tmp_path / "oxford_pets" / "seed1"
    base = json.loads((run / "base" / "results.json").read_text())
    new = json.loads((run / "new" / "results.json").read_text())
    assert base["subsample"] == "base" and new["subsample"] == "new" and new["method"] == name
    if method == "dept":  # its head on the base classes, CoOp's logits alone on the new ones
        assert base["cat_head"] and not new["cat_head"]
    assert base["num_classes"] == new["num_classes"] == 2 and base["num_test"] == new["num_test"] == 8
    result = summary["datasets"]["oxford_pets"]
    assert (result["base"], result["new"]) == (base["test_acc"], new["test_acc"])
    assert json.loads((tmp_path / "base_to_new.json").read_text()) == summary


def test_base_to_new_refuses_methods_without_a_prompt_before_training(tmp_path):
    with pytest.raises(ValueError, match="method=linear_probe learns weights of the base classes only"):
        main(["base_to_new", "datasets=oxford_pets", "seeds=1", f"out={tmp_path}", "method=linear_probe"])
    assert not any(tmp_path.iterdir())


def test_unknown_protocol_is_one_clear_error():
    with pytest.raises(ValueError, match="choose one of domain_generalization, cross_dataset, base_to_new"):
        main(["few_shot"])
