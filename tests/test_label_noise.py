"""Noisy few-shot labels: how many flip, to what, reproducibly, and where the run records them."""

from __future__ import annotations

import json

import pytest

from src.data.label_noise import flip_count, flip_labels
from src.data.samples import Sample
from src.run.training import train
from tests.conftest import make_cfg

CLASSES = [f"class{c}" for c in range(5)]
ITEMS = [Sample(f"/d/{c}_{i}.jpg", c, CLASSES[c]) for c in range(5) for i in range(16)]


def test_rate_zero_is_the_identity():
    noisy, flipped = flip_labels(ITEMS, 0.0, seed=1, classnames=CLASSES)
    assert noisy == ITEMS and flipped == []


@pytest.mark.parametrize("rate, per_class", [(0.125, 2), (0.25, 4), (0.5, 8)])
def test_the_documented_count_flips_to_other_classes_in_range(rate, per_class):
    noisy, flipped = flip_labels(ITEMS, rate, seed=1, classnames=CLASSES)
    assert [item.path for item in noisy] == [item.path for item in ITEMS]  # same images, same order
    changed = [(a, b) for a, b in zip(ITEMS, noisy, strict=True) if a.label != b.label]
    assert len(changed) == len(flipped) == 5 * per_class
    for c in range(5):  # round(rate * 16) per class
        assert sum(a.label == c for a, _ in changed) == per_class == flip_count(rate, 16)
    for clean, new in changed:
        assert 0 <= new.label < 5 and new.label != clean.label and new.classname == CLASSES[new.label]
    assert sorted((a, b.label) for a, b in changed) == sorted(flipped)


def test_flips_are_a_function_of_the_seed():
    first, _ = flip_labels(ITEMS, 0.25, seed=1, classnames=CLASSES)
    assert flip_labels(ITEMS, 0.25, seed=1, classnames=CLASSES)[0] == first
    assert flip_labels(list(reversed(ITEMS)), 0.25, seed=1, classnames=CLASSES)[0] == list(reversed(first))
    assert flip_labels(ITEMS, 0.25, seed=2, classnames=CLASSES)[0] != first


def test_rounding_and_bad_rates():
    assert [flip_count(0.25, n) for n in (1, 2, 4, 6)] == [0, 1, 1, 2]  # halves round up
    with pytest.raises(ValueError, match="data.label_noise=1.5"):
        flip_labels(ITEMS, 1.5, seed=1, classnames=CLASSES)


def test_a_noisy_run_records_the_flips(tiny_overrides, tmp_path):
    cfg = make_cfg(
        ["dataset=oxford_pets", "shots=4", "method=zeroshot", "data.label_noise=0.5", *tiny_overrides],
        tmp_path,
    )
    results = train(cfg)
    assert results["label_noise"] == 0.5 and results["noisy_labels"] == 4 * 2
    fewshot = json.loads((tmp_path / "fewshot.json").read_text())
    flipped = fewshot["label_noise"]["flipped"]
    assert fewshot["label_noise"]["rate"] == 0.5 and len(flipped) == 8
    clean = {path: label for path, label, _ in fewshot["train"]}  # the list keeps the true labels
    assert all(clean[path] == original != noisy for path, original, noisy in flipped)


def test_report_keeps_noisy_runs_apart_from_clean_ones(tmp_path):
    from src.report import cells, load_runs
    from tests.test_report import write_run

    for seed in (1, 2):
        write_run(tmp_path, f"clean/seed{seed}", 80.0 + seed, seed=seed)
        write_run(tmp_path, f"noisy/seed{seed}", 60.0 + seed, seed=seed, label_noise=0.25)
        kgcoop = write_run(tmp_path, f"kg/seed{seed}", 70.0, seed=seed, method="kgcoop")
        fields = {"ctx": "unified", "n_ctx": 4, "class_token_position": "end", "ctx_init": "a photo of a"}
        kgcoop.write_text(json.dumps({**json.loads(kgcoop.read_text()), **fields}))
    table = cells(load_runs(tmp_path)).set_index("variant")
    assert table.loc["coop unified end M16", "mean"] == 81.5
    assert table.loc["coop unified end M16 noise=0.25", "mean"] == 61.5
    assert table.loc["kgcoop unified end M4 init='a photo of a'", "n"] == 2
