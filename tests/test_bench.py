"""The benchmark script's arguments (those of the prepared GPU run too) and its grid arithmetic.
The figures themselves are measured by `make bench` and experiments/benchmarks/gpu_check.sh."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "experiments" / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_scripts_arguments_parse(bench):
    script = (ROOT / "experiments" / "benchmarks" / "gpu_check.sh").read_text()
    (line,) = re.findall(r'^BENCH_ARGS="([^"]+)"', script, flags=re.M)
    args = bench.parse_args(shlex.split(line))
    assert (args.device, args.precision, args.backbone) == ("cuda", "bf16", "ViT-B-16-quickgelu")
    assert args.classes == 1000
    assert args.text_classes == 1000 and args.extra_step == ["RN50-quickgelu:37"]
    assert args.e2e and args.grid and (args.repeats, args.warmup) == (10, 3)
    assert args.pack == 6 and args.pack_classes == [37, 1000] and not args.pack_only
    cpu = bench.parse_args([])
    assert cpu.text_classes == 250 and not cpu.e2e and cpu.grid_class_counts == [10, 100, 400, 1000]
    assert cpu.pack == 0
    with pytest.raises(SystemExit):
        bench.parse_args(["--extra-step", "RN50"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--pack-only"])  # a pack of how many runs?


def test_grid_hours_count_steps_epochs_seeds_variants_and_test_images(bench, monkeypatch):
    monkeypatch.setattr(sys.modules[bench.grid_hours.__module__], "GRID_DATASETS", {"eurosat": (10, 8100)})
    counts = [10, 100]
    step_s = {"reference": 1.0, "default": 0.25}
    times = {(mode, *v): [t, t] for mode, t in step_s.items() for v in bench.GRID_VARIANTS}
    hours = bench.grid_hours(times, counts, encode_per_image_s=0.001)
    # 10 classes, batch 32: 1 step per epoch for 1, 2, 4 shots (none dropped), 2 for 8, 5 for 16
    steps = 50 * 1 + 100 * 1 + 100 * 1 + 200 * 2 + 200 * 5
    runs = 3 * 4  # seeds x context variants, per shot count
    assert hours["reference"] == pytest.approx((steps * runs * 1.0 + 5 * runs * 8.1) / 3600)
    assert hours["default"] == pytest.approx((steps * runs * 0.25 + 8.1) / 3600)
    assert "packed" not in hours
    # packed: the 12 runs of a shot count take one step together
    times[("packed",)] = [0.5, 0.5]
    hours = bench.grid_hours(times, counts, encode_per_image_s=0.001)
    assert hours["packed"] == pytest.approx((steps * 0.5 + 8.1) / 3600)
    assert len(bench.GRID_PACK) == runs


def test_step_times_are_interpolated_between_class_counts(bench):
    counts, times = [10, 100, 1000], [1.0, 2.0, 11.0]
    assert bench.interpolate(counts, times, 5) == 1.0
    assert bench.interpolate(counts, times, 55) == pytest.approx(1.5)
    assert bench.interpolate(counts, times, 1000) == pytest.approx(11.0)
    assert bench.interpolate(counts, times, 1100) == pytest.approx(12.0)
    assert bench.interpolate([10, 100], [2.0, 1.0], 1000) == 1.0  # noise never makes it shrink


def test_targets_name_each_figure_with_its_threshold(bench):
    import torch

    figures = {"step_speedup": 3.5, "cached_step_speedup": 4.0, "step_RN50-quickgelu_37_speedup": 1.4}
    figures["pack6_cached_37_speedup"] = 5.5
    checked = bench.targets(figures, torch.device("cuda"), 1000, ["RN50-quickgelu_37"], pack=6)
    assert checked["pack6_cached_37_speedup"] == {"value": 5.5, "target": ">= 5.0", "met": True}
    assert checked["grid_gpu_hours_packed"]["met"] is None
    assert checked["step_speedup"] == {"value": 3.5, "target": ">= 3.0", "met": True}
    assert checked["cached_step_speedup"]["met"] is False
    assert checked["step_RN50-quickgelu_37_speedup"]["met"] is True
    assert checked["e2e_overhead_1000"] == {"value": None, "target": "<= 1.2", "met": None}
    assert set(checked) >= {"text1000_unified_speedup", "text1000_csc_speedup", "grid_speedup"}


def test_methods_training_cost_per_image_against_coop(bench):
    args = "--methods cocoop,dept --methods-only --methods-backbone coop-tiny --classes 3"
    line = bench.main([*args.split(), "--methods-batch", "2", "--repeats", "1", "--warmup", "1"])
    assert (line["methods_backbone"], line["methods_batch"], line["methods_steps"]) == ("coop-tiny", 2, 1)
    coop = line["method_coop_ms_per_image"]
    for name in ("coop", "cocoop", "dept"):  # CoOp, every ratio's reference, measured unasked
        ms, step_s = line[f"method_{name}_ms_per_image"], line[f"method_{name}_step_s"]
        assert ms > 0 and ms == pytest.approx(1000 * step_s / 2, abs=0.03)  # the line's 4 decimals
        assert line[f"method_{name}_vs_coop"] == pytest.approx(ms / coop, abs=1e-3)
    assert line["method_coop_vs_coop"] == 1.0
    assert "step_reference_s" not in line  # --methods-only: nothing else measured


def test_methods_not_timed_step_by_step_or_not_fitting_the_backbone_are_refused(bench, capsys):
    for argv, says in (
        (["--methods", "tpt"], "not trained step by step"),  # tuned at test time
        (["--methods", "coop,linear_probe"], "--methods linear_probe: not trained step by step"),
        (["--methods", "cocop"], "no method=cocop"),  # a typo
        (["--methods", "foo_dept"], "no method.base=foo"),
        (["--methods", "maple", "--methods-backbone", "coop-tiny"], "prompt_depth=9: coop-tiny has 2 blocks"),
        (["--methods", "coop", "--methods-backbone", "ViT-X"], "--methods-backbone ViT-X: not an open_clip"),
        (["--methods-only"], "--methods-only: name the methods"),
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert says in capsys.readouterr().err.splitlines()[-1]
    args = bench.parse_args(["--methods", "maple_dept,kgcoop"])  # ViT-B-16: MaPLe's 9 of 12 blocks
    assert bench.method_names(args) == ["coop", "maple_dept", "kgcoop"]
    assert args.method_configs["maple_dept"].method.name == "maple_dept"
    assert args.method_configs["maple_dept"].method.module.base == "src.methods.maple.MaPLe"
