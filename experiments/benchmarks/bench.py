"""CoOp's cost: the reference computation against this project's exact fast paths.

    make bench                       # ViT-B/32 (random weights), 224 px, batch 32, CPU fp32
    experiments/benchmarks/gpu_check.sh   # GPU: every figure and target of the GPU table

Measures, in one process and on the same inputs:
  - the training step (forward + backward + SGD step) in (a) reference mode
    (model.text_path=reference: 77-position prompts, image encoder every step), (b) the default
    mode (model.text_path=auto: grouped on CPU, batched on a GPU), (c) the default mode on cached
    image features; for the main backbone and for each `--extra-step BACKBONE:CLASSES`;
  - the text side alone (prompt learner + text encoder, forward + backward, cross-entropy
    against `batch` image features) for `--text-classes` ImageNet classes, unified and
    class-specific, for every text path (reference, grouped, batched); "default" is the path
    model.text_path=auto takes on this device;
  - data loading: JPEG decoding and train augmentation per image;
  - with `--e2e`: whole `src.train` runs (the quick start, and a 1000-class 2-shot run on
    generated images), their training wall time against steps x the step time measured here
    (`e2e_overhead_*`);
  - with `--grid`: the paper's few-shot grid in GPU hours, from step times measured at several
    class counts and each dataset's real sizes, reference mode against default, and packed
    (`pack=true`: the 3 seeds x 4 context variants of a dataset and shot count as one pack);
  - with `--pack R`: R runs (seeds of the default context) trained as one pack (src/packing/train.py)
    against one run alone, at `--pack-classes` classes, on images and on cached features: the step
    time per run and the peak memory of the pack (`pack{R}_{images,cached}_{classes}_*`);
    `--pack-only` measures nothing else (with `--grid`: the grid too);
  - with `--pack-memory C`: the activations a step of each of the grid's 4 context variants keeps
    for backward at C classes (`--grid-backbone`, fp32, forward only), and a pack of the grid's 12
    runs (3 seeds x 4 variants) from them: a pack's grow linearly in its runs (`--pack`'s ratio);
  - with `--methods NAMES`: each gradient-trained method's training cost per image against CoOp's
    (`method_<name>_ms_per_image`, `method_<name>_vs_coop`): the method built as a run builds it
    (its `method=` config composed as the command line composes it, `build_method`) on
    `--methods-backbone` with random weights and `--classes` classes, trained by a Lightning Trainer
    on random images in batches of `--methods-batch` (every method on images, as the published
    figures: the original code encodes the images in every step), `--warmup` + `--repeats` steps,
    the median of the timed ones; DePT on another base as `<base>_dept` (maple_dept, ...). Not
    here: the methods not trained step by step on images (linear_probe, tip_adapter,
    tip_adapter_f: cached features of the data module; tpt: tuned at test time; zeroshot,
    zeroshot_ensemble: no training). `--methods-only` measures nothing else.
Prints a table, then one JSON line with the figures, the ratios and the targets of the device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402
import torch  # noqa: E402

from experiments.benchmarks.measures.common import (  # noqa: E402, F401  (the tests read these here)
    GRID_CLASS_COUNTS,
    GRID_DATASETS,
    GRID_PACK,
    GRID_VARIANTS,
    method_config,
    method_names,
)
from experiments.benchmarks.measures.grid import Grid, grid_hours, interpolate  # noqa: E402, F401
from experiments.benchmarks.measures.methods import Methods  # noqa: E402
from experiments.benchmarks.measures.packs import Packs  # noqa: E402
from experiments.benchmarks.measures.runs import Runs  # noqa: E402
from experiments.benchmarks.measures.steps import Steps, data_loading_cost  # noqa: E402
from experiments.benchmarks.measures.targets import targets  # noqa: E402
from src.models.clip import register_project_configs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--classes", type=int, default=37, help="classes for the training step")
    parser.add_argument("--text-classes", type=int, default=None, help="classes for the text side (250)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    parser.add_argument(
        "--extra-step",
        action="append",
        default=[],
        metavar="BACKBONE:CLASSES",
        help="also the training step of this backbone and class count (e.g. RN50-quickgelu:37)",
    )
    parser.add_argument(
        "--skip-reference-text", action="store_true", help="skip the slow reference text runs"
    )
    parser.add_argument("--e2e", action="store_true", help="whole src.train runs: e2e_overhead_*")
    parser.add_argument("--e2e-model", default=None, help="model= of the e2e runs (vit_b16; CPU: tiny)")
    parser.add_argument("--e2e-epochs", type=int, default=None, help="quick start epochs (its own: 200)")
    parser.add_argument("--e2e-classes", type=int, default=1000, help="classes of the large e2e run")
    parser.add_argument("--e2e-large-epochs", type=int, default=10, help="epochs of the large e2e run")
    parser.add_argument("--grid", action="store_true", help="estimate the few-shot grid's GPU hours")
    parser.add_argument("--grid-backbone", default="RN50-quickgelu", help="the grid's backbone")
    parser.add_argument(
        "--grid-class-counts",
        default=",".join(map(str, GRID_CLASS_COUNTS)),
        help="class counts whose step times are measured for the grid",
    )
    parser.add_argument("--pack", type=int, default=0, metavar="R", help="also R runs trained as one pack")
    parser.add_argument("--pack-classes", default="37,1000", help="class counts of the pack measurement")
    parser.add_argument("--pack-only", action="store_true", help="only the pack (and --grid) measurements")
    parser.add_argument(
        "--pack-memory",
        type=int,
        default=0,
        metavar="C",
        help="memory of a pack of the grid's 12 runs at C classes",
    )
    parser.add_argument(
        "--methods",
        default="",
        metavar="NAMES",
        help="each method's training cost per image against CoOp's (comma list of method= names)",
    )
    parser.add_argument("--methods-backbone", default="ViT-B-16", help="their backbone (random weights)")
    parser.add_argument("--methods-batch", type=int, default=4, help="the methods' common batch")
    parser.add_argument("--methods-only", action="store_true", help="only --methods (and --pack, --grid)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    if args.text_classes is None:
        args.text_classes = 250 if args.device == "cpu" else 1000
    for spec in args.extra_step:
        name, _, classes = spec.rpartition(":")
        if not name or not classes.isdigit():
            parser.error(f"--extra-step {spec!r}: give BACKBONE:CLASSES, e.g. RN50-quickgelu:37")
    args.grid_class_counts = [int(c) for c in str(args.grid_class_counts).split(",")]
    args.pack_classes = [int(c) for c in str(args.pack_classes).split(",")]
    if args.pack_only and not (args.pack or args.pack_memory):
        parser.error("--pack-only: give the pack's size with --pack R (or --pack-memory C)")
    args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    if args.methods_only and not args.methods:
        parser.error("--methods-only: name the methods with --methods NAMES (e.g. coop,cocoop)")
    # every method's config composed and checked against the backbone before anything is measured
    args.method_configs = {}
    if args.methods:
        register_project_configs()  # the tiny architectures of src/models/configs too
        if args.methods_backbone not in open_clip.list_models():
            parser.error(
                f"--methods-backbone {args.methods_backbone}: not an open_clip architecture (ViT-B-16)"
            )
    for name in method_names(args) if args.methods else []:
        try:
            args.method_configs[name] = method_config(name, args.methods_backbone)
        except ValueError as err:
            parser.error(f"--methods {name}: {err}")
    return args


class Bench(Steps, Packs, Methods, Runs, Grid):
    """Every family of measurements, sharing one CLIP per backbone on the device."""


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bench = Bench(args)
    device = bench.device
    extra_tags = []
    if not (args.pack_only or args.methods_only):
        bench.steps(args.backbone, args.classes)
        for spec in args.extra_step:
            backbone, _, classes = spec.rpartition(":")
            tag = f"{backbone}_{classes}"
            extra_tags.append(tag)
            bench.steps(backbone, int(classes), tag)
        bench.text_side()
        bench.exactness()
        decode, augment = data_loading_cost(bench.clip(args.backbone).image_size)
        bench.rows.append(("JPEG decode per image", decode, 0))
        bench.rows.append(("train augmentation per image", augment, 0))
        bench.figures.update({"decode_per_image_s": decode, "augment_per_image_s": augment})
    if args.pack:
        bench.pack()
    if args.pack_memory:
        bench.pack_memory()
    if args.grid:
        bench.grid()
    if args.e2e and not (args.pack_only or args.methods_only):
        bench.e2e()
    if args.methods:
        bench.methods()
    figures = bench.figures
    figures.update(
        backbone=args.backbone,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        precision=args.precision,
        batch=args.batch,
        classes=args.classes,
        text_classes=args.text_classes,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    figures["pack"] = args.pack
    checked = targets(figures, device, args.text_classes, extra_tags, args.pack)
    line = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}
    line["targets"] = checked
    line["all_targets_met"] = all(t["met"] for t in checked.values())

    from rich.console import Console
    from rich.table import Table

    title = f"CoOp, {args.backbone} random weights, {args.device} {args.precision}"
    table = Table(title=title)
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("peak MB", justify="right")
    for name, seconds, peak in bench.rows:
        table.add_row(name, f"{seconds:.4f}", f"{peak / 2**20:.0f}" if peak else "")
    console = Console(stderr=True)
    if bench.rows:
        console.print(table)
    if args.methods:
        title = (
            f"Training cost per image, {args.methods_backbone} random weights, {args.classes} classes, "
            f"batch {args.methods_batch}, {args.device} {args.precision}"
        )
        table = Table(title=title)
        for column in ("method", "run", "ms per step", "ms per image", "vs CoOp"):
            table.add_column(column, justify="left" if column in ("method", "run") else "right")
        for name in method_names(args):
            step_ms = 1000 * figures[f"method_{name}_step_s"]
            ms, ratio = figures[f"method_{name}_ms_per_image"], figures[f"method_{name}_vs_coop"]
            table.add_row(name, bench.method_runs[name], f"{step_ms:.0f}", f"{ms:.1f}", f"{ratio:.2f}")
        console.print(table)
    text = json.dumps(line)
    print(text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")
    return line


def _reexec_with_mmap_threshold() -> None:
    # Large allocations must go back to the OS when freed, so that the resident-set size tracks
    # live memory and each measurement's peak is its own (glibc raises its mmap threshold otherwise).
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])


if __name__ == "__main__":
    _reexec_with_mmap_threshold()
    main()
