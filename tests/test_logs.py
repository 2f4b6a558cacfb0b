"""Quiet logs: a quick start prints the project's lines only (what runs on which device and
precision, the data, the few-shot file, the zero-shot baseline, the result and where it is); what
libraries say goes to the run's log file, and the warnings the project causes on purpose are gone."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

from src.models.clip import shipped_weights
from src.run.logs import ProjectRecords

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"\[[\d :,-]+\]\[(?P<logger>[\w.]+)\]\[(?P<level>[A-Z]+)\] - (?P<message>.*)")


def test_a_quick_start_prints_a_few_lines_of_its_own(tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "src.train",
        "experiment=quickstart",
        "trainer.max_epochs=1",  # the quick start's log, shorter
        f"hydra.run.dir={run}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = (done.stdout + done.stderr).splitlines()
    lines = [LINE.fullmatch(line) for line in printed]
    assert all(lines), printed  # no bare warnings, tips or tracebacks
    assert {(line["logger"], line["level"]) for line in lines} <= {
        ("src.run.training", "INFO"),  # the run: method, backbone, devices, accuracies
        ("src.data.datamodule", "INFO"),
        ("src.data.feature_cache", "INFO"),
        ("src.data.in_memory", "INFO"),  # the train images decoded into memory
        ("src.models.text_encoder", "INFO"),  # which text path runs (model.text_path)
    }
    assert len(lines) <= 12
    messages = [line["message"] for line in lines]
    weights = shipped_weights("coop-tiny-digits.safetensors")
    assert messages[0] == f"coop with coop-tiny-narrow ({weights}) on cpu, precision 32-true"
    assert f"few-shot subsets saved to {run / 'fewshot.json'}" in messages[1]
    assert messages[2].endswith(
        "digits: 160 train (16-shot, seed 1, reference sampler), 40 val, 361 test images, 10 classes"
    )
    template = re.escape("'a photo of the number {}.'")
    gain = rf"zero-shot CLIP \({template}\) \d+\.\d\d%, coop \d+\.\d\d%: [+-]\d+\.\d\d points"
    assert re.fullmatch(gain, messages[-2])
    assert re.fullmatch(rf"test accuracy \d+\.\d\d% \(361 images\); results in {run}", messages[-1])

    output = done.stdout + done.stderr
    for noise in ("eval mode", "LeafSpec", "srun", "Parsing model identifier", "litlogger", "GPU available"):
        assert noise not in output
    log_file = (run / "train.log").read_text()  # libraries' lines are kept there
    for routed in ("Parsing model identifier", "GPU available: False", "Seed set to 1", *messages):
        assert routed in log_file


def test_the_console_shows_the_project_and_libraries_errors():
    def shown(name: str, level: int) -> bool:
        return ProjectRecords().filter(logging.LogRecord(name, level, "", 0, "", None, None))

    assert shown("src.train", logging.INFO) and shown("__main__", logging.INFO)
    assert shown("hydra_plugins.grid_sweeper", logging.INFO)
    assert not shown("root", logging.WARNING) and not shown("pytorch_lightning.trainer", logging.INFO)
    assert shown("root", logging.ERROR)
