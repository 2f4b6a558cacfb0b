"""Whole `src.train` runs: their wall time against steps x the step time measured (`--e2e`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch

from experiments.benchmarks.measures.common import (
    ROOT,
    BenchBase,
)


class Runs(BenchBase):
    """Whole `src.train` runs: their wall time against steps x the step time measured (`--e2e`)."""

    def e2e(self) -> None:
        """Whole src.train runs: their training wall time (`train_time_s`, the fit) against the
        steps they made x the step time measured here for the same backbone and classes."""
        args = self.args
        on_cpu = self.device.type == "cpu"
        model = args.e2e_model or ("tiny" if on_cpu else "vit_b16")
        precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(args.precision, "32-true")
        common = [
            f"model={model}",
            "model.pretrained=null",
            f"trainer={'cpu' if on_cpu else 'gpu'}",
            f"trainer.precision={precision}",
            "trainer.enable_progress_bar=false",
        ]
        quickstart = ["experiment=quickstart", *common]
        if args.e2e_epochs:
            quickstart.append(f"trainer.max_epochs={args.e2e_epochs}")
        with tempfile.TemporaryDirectory() as tmp:
            self._e2e_run("quickstart", quickstart, Path(tmp) / "quickstart")
            root = generated_folder_dataset(Path(tmp) / "data", args.e2e_classes)
            large = [
                "dataset=folder",
                f"dataset.root={root}",
                "dataset.name=generated",
                "shots=2",
                f"trainer.max_epochs={args.e2e_large_epochs}",
                *common,
            ]
            self._e2e_run(str(args.e2e_classes), large, Path(tmp) / "large")

    def _e2e_run(self, tag: str, overrides: list[str], out: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.pop("MALLOC_MMAP_THRESHOLD_", None)  # the runs allocate as a user's would
        command = [
            sys.executable,
            "-m",
            "src.train",
            *overrides,
            f"hydra.run.dir={out}",
            f"paths.cache_dir={out.parent / 'cache'}",
        ]
        start = time.perf_counter()
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            output = (run.stdout + run.stderr)[-4000:]
            raise RuntimeError(f"e2e run {tag} failed ({' '.join(command)}):\n{output}")
        results = json.loads((out / "results.json").read_text())
        steps = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        prompt = torch.load(out / "prompt.pt", weights_only=True)
        step_s, _ = self.step_time(prompt["backbone"], prompt["classnames"], "auto", cached=False)
        train_s = results["train_time_s"]
        self.rows.append((f"e2e {tag}: fit of {steps} steps ({results['num_classes']} classes)", train_s, 0))
        self.figures.update(
            {
                f"e2e_{tag}_train_s": train_s,
                f"e2e_{tag}_process_s": wall,
                f"e2e_{tag}_steps": steps,
                f"e2e_{tag}_step_s": step_s,
                f"e2e_overhead_{tag}": train_s / (steps * step_s),
            }
        )


def generated_folder_dataset(root: Path, classes: int) -> Path:
    """train/ (2 small JPEGs per class), val/ and test/ (1 each) folders, the classes named as
    ImageNet's."""
    import numpy as np
    from PIL import Image

    names = []
    for name in open_clip.IMAGENET_CLASSNAMES[:classes]:
        name = name.replace("/", " ")
        names.append(name if name not in names else f"{name} {len(names)}")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root
