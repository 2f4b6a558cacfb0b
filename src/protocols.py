"""The evaluation protocols of the paper and its follow-up (CoCoOp), one command each.

python -m src.protocols domain_generalization ckpt=outputs/imagenet/coop/.../prompt.pt
python -m src.protocols cross_dataset ckpt=outputs/imagenet/coop/.../prompt.pt
python -m src.protocols base_to_new method=cocoop model=vit_b16 [datasets=a,b] [seeds=1,2,3]

Protocol arguments: ckpt=, targets= (transfer protocols), datasets=, seeds=, out= (base-to-new);
every other argument is a config override of the runs (model=..., paths.data_dir=..., trainer=...).
Each protocol writes a summary JSON:
  - domain_generalization / cross_dataset: <prompt folder>/<protocol>.json (each target's run in
    <prompt folder>/eval/<target>/), the targets' accuracies and their mean;
  - base_to_new: <out>/base_to_new.json; runs in <out>/<dataset>/seed<s>/{base,new}/. A base run
    whose results.json exists is not trained again, so the command can be re-run after a sweep
    or a crash. H is the harmonic mean of the base and new accuracies averaged over seeds, per
    dataset; the average row's H is that of the averages over datasets (as the paper reports).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from src.common.files import write_json
from src.common.prompt_file import run_folder
from src.data.benchmark import BASE_TO_NEW, CROSS_DATASET, DOMAIN_GENERALIZATION
from src.methods.base import method_arguments, method_class
from src.run.cli import run
from src.run.config import compose_config
from src.run.evaluation import evaluate
from src.run.logs import console_logging
from src.run.results import training_results
from src.run.training import train

log = logging.getLogger(__name__)

PROTOCOL_ARGS = ("ckpt", "targets", "datasets", "seeds", "out")


def transfer(protocol: str, ckpt: str | Path, targets: list[str], overrides: list[str]) -> dict[str, Any]:
    """Evaluates one prompt on each target dataset (domain generalisation, cross-dataset)."""
    ckpt = Path(ckpt)
    source = training_results(ckpt)
    folder = run_folder(ckpt)  # of a prompt.pt or last.ckpt, or a Dassl checkpoint's output folder
    accuracies = {}
    for target in targets:
        # the training run's seed: it also fixes the weights of random-weight test models
        args = [f"ckpt={ckpt}", f"dataset={target}", f"seed={source.get('seed', 1)}", *overrides]
        cfg = compose_config("eval", args, folder / "eval" / target)
        accuracies[target] = evaluate(cfg)["test_acc"]
    summary = {
        "protocol": protocol,
        "ckpt": str(ckpt),
        "source": {"dataset": source.get("dataset"), "test_acc": source.get("test_acc")},
        "targets": accuracies,
        "average": statistics.mean(accuracies.values()),
    }
    write_json(folder / f"{protocol}.json", summary)
    return summary


def base_to_new(
    datasets: list[str], seeds: list[int], overrides: list[str], out: str | Path | None = None
) -> dict[str, Any]:
    """Trains on the base classes of each dataset and seed, tests on base and new classes."""
    rows = []
    for dataset in datasets:
        for seed in seeds:
            args = [f"dataset={dataset}", f"seed={seed}", *overrides]
            cfg = compose_config("train", [*args, "dataset.subsample=base"])
            method = method_class(cfg.method)
            zero_shot = method.zero_shot
            refusal = method.transfer_refusal(method_arguments(method, cfg.method.module))
            if not (method.trains and refusal is None or zero_shot):
                raise ValueError(
                    f"method={cfg.method.name} learns weights of the base classes only "
                    f"({refusal or 'it trains nothing'}): base-to-new needs a trained method that "
                    "transfers to other classes (a prompt: method=coop, cocoop, ...) or a zero-shot method"
                )
            if out is None:
                out = Path(cfg.paths.log_dir) / "base_to_new" / f"{cfg.method.name}_{cfg.model.name}"
            run_dir = Path(out) / dataset / f"seed{seed}"
            with open_dict(cfg):
                cfg.paths.output_dir = str(run_dir / "base")
            done = run_dir / "base" / "results.json"
            base = json.loads(done.read_text()) if done.is_file() else train(cfg)
            if zero_shot:
                new = train(compose_config("train", [*args, "dataset.subsample=new"], run_dir / "new"))
            else:
                new = evaluate(_prompt_on_new_classes(cfg, run_dir))
            rows.append({"dataset": dataset, "seed": seed, "base": base["test_acc"], "new": new["test_acc"]})
    summary = base_to_new_summary(rows)
    write_json(Path(out) / "base_to_new.json", summary)
    return summary


def _prompt_on_new_classes(base_cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The evaluation of the base run's prompt on the new classes, with the base run's settings."""
    cfg = base_cfg.copy()
    with open_dict(cfg):
        cfg.dataset.subsample = "new"
        cfg.ckpt = str(run_dir / "base" / "prompt.pt")
        cfg.paths.output_dir = str(run_dir / "new")
    return cfg


def base_to_new_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset the mean base and new accuracies over seeds and their harmonic mean H; then the
    means over datasets and their H."""
    datasets = {}
    for name in dict.fromkeys(row["dataset"] for row in rows):
        runs = [row for row in rows if row["dataset"] == name]
        base = statistics.mean(row["base"] for row in runs)
        new = statistics.mean(row["new"] for row in runs)
        datasets[name] = {"base": base, "new": new, "H": harmonic_mean(base, new), "seeds": len(runs)}
    base = statistics.mean(d["base"] for d in datasets.values())
    new = statistics.mean(d["new"] for d in datasets.values())
    average = {"base": base, "new": new, "H": harmonic_mean(base, new)}
    return {"protocol": "base_to_new", "datasets": datasets, "average": average, "runs": rows}


def harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new else 0.0


def main(argv: list[str]) -> dict[str, Any]:
    protocols = ("domain_generalization", "cross_dataset", "base_to_new")
    if not argv or argv[0] not in protocols:
        raise ValueError(f"protocol {argv[0] if argv else ''!r}: choose one of {', '.join(protocols)}")
    name, rest = argv[0], argv[1:]
    args = dict(arg.split("=", 1) for arg in rest if arg.split("=", 1)[0] in PROTOCOL_ARGS)
    overrides = [arg for arg in rest if arg.split("=", 1)[0] not in PROTOCOL_ARGS]
    if name == "base_to_new":
        datasets = args["datasets"].split(",") if "datasets" in args else list(BASE_TO_NEW)
        seeds = [int(s) for s in args.get("seeds", "1,2,3").split(",")]
        return base_to_new(datasets, seeds, overrides, args.get("out"))
    if "ckpt" not in args:
        raise ValueError(f"{name} needs ckpt=<prompt.pt of a unified context trained on imagenet>")
    default = DOMAIN_GENERALIZATION if name == "domain_generalization" else CROSS_DATASET
    targets = args["targets"].split(",") if "targets" in args else list(default)
    return transfer(name, args["ckpt"], targets, overrides)


if __name__ == "__main__":
    console_logging()  # the project's lines and libraries' errors
    run(lambda: main(sys.argv[1:]))
