"""One whole MaPLe run of the original code, on the quick start's digits and the project's tiny CLIP,
beside the same run here: the same few-shot images, learned prompts and test accuracy.

The original side is the official MaPLe (muzairkhattak/multimodal-prompt-learning at commit
MAPLE_COMMIT) on Dassl (KaiyangZhou/Dassl.pytorch at DASSL_COMMIT): its `train.py`, run as a script,
with its `trainers/maple.py` and `clip/model.py` imported from the checkout with the few textual
changes in PATCHES (each an identity on the original's own setting, ViT-B/16 in fp16: it only
generalises what the tiny CLIP and fp32 need), its loader of CLIP weights replaced by one that gives
the official `clip.build_model` the project's shipped weights, and the digits registered as a Dassl
dataset (`Digits` below, made as the official EuroSAT class: the split file, Dassl's
`generate_fewshot_dataset` for train then val, `subsample_classes`). The digits' split file is
written from the project's reader (the split the project reads), its paths relative to the
project's rendered images, so both read the same files in the same order.

Regenerate the stored result (tests/fixtures/parity/maple_whole_run.{json,safetensors}) and compare
with the project's run (`--project`), set up as experiments/parity/README.md says (the checkouts at
their commits, the extra packages in /tmp/parity-extra):

    PYTHONPATH=. .venv/bin/python experiments/parity/maple_whole_run.py \
        /tmp/multimodal-prompt-learning --dassl /tmp/Dassl.pytorch --project

The project's side of the comparison is
`python -m src.train experiment=quickstart method=maple model=tiny_pretrained
method.module.prompt_depth=2 ctx.n_ctx=2 baseline=null` (`project_overrides`;
tests/test_maple_whole_run.py runs it in-process against the stored result).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.parity.common import DASSL_FIXTURES, check_commit, put_on_path, torch_compat  # noqa: E402
from src.data.datasets.digits import Digits as ProjectDigits  # noqa: E402
from src.models.clip import CONFIG_DIR, shipped_weights  # noqa: E402

MAPLE_COMMIT = "69bce21ae8eda80ad6187534b2dce09cf6c59e17"
DASSL_COMMIT = "c61a1b570ac6333bd50fb5ae06aea59002fb20bb"
MODEL = "coop-tiny-narrow"  # model=tiny_pretrained
WEIGHTS = shipped_weights("coop-tiny-digits.safetensors")
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "maple_whole_run"

# The quick start's recipe (experiment=quickstart, conf/dataset/digits.yaml) with MaPLe's
# (conf/method/maple.yaml = configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml), prompt depth 2
# (the tiny CLIP has 2 blocks per encoder).
SHOTS, SEED, DEPTH, N_CTX = 16, 1, 2, 2
IMAGE_SIZE, CROP_SCALE = 32, (0.5, 1.0)
TRANSFORMS = ["random_resized_crop", "normalize"]  # digits: no flip (dataset.hflip=false)

# The learned tensors, by the project's names (MaPLe's state: ctx, deep_text, couplings) and the
# official ones (prompt_learner.*).
OFFICIAL_NAMES = {
    "ctx": ["ctx"],
    "deep_text": [f"compound_prompts_text.{i}" for i in range(DEPTH - 1)],
    "couplings.0.weight": ["proj.weight"],
    "couplings.0.bias": ["proj.bias"],
    **{
        f"couplings.{i + 1}.{p}": [f"compound_prompt_projections.{i}.{p}"]
        for i in range(DEPTH - 1)
        for p in ("weight", "bias")
    },
}


def patches(config: dict) -> dict[str, list[tuple[str, str, str]]]:
    """(text, replacement, why) per official module; each text occurs exactly once."""
    vision, text = config["vision_cfg"], config["text_cfg"]
    same = "in fp16 (the original) the same cast; in fp32 no rounding of the prompts to fp16"
    return {
        "clip.model": [
            (
                "return x * torch.sigmoid(1.702 * x)",
                "return F.gelu(x)",
                "the tiny CLIP is an open_clip model without quick_gelu: exact GELU",
            ),
            (
                "vision_heads = vision_width // 64",
                f"vision_heads = vision_width // {vision['head_width']}",
                "heads of the tiny CLIP's image encoder (width 64, heads of 32)",
            ),
            (
                "transformer_heads = transformer_width // 64",
                f"transformer_heads = {text['heads']}",
                "heads of the tiny CLIP's text encoder (width 32, 2 heads)",
            ),
            (
                "visual_context = visual_context.expand(x.shape[1], -1, -1).permute(1, 0, 2).half()",
                "visual_context = visual_context.expand(x.shape[1], -1, -1).permute(1, 0, 2).type(x.dtype)",
                same,
            ),
            (
                "textual_context = textual_context.expand(x.shape[1], -1, -1).permute(1, 0, 2).half()",
                "textual_context = textual_context.expand(x.shape[1], -1, -1).permute(1, 0, 2).type(x.dtype)",
                same,
            ),
            (
                "visual_ctx = shared_ctx.expand(x.shape[0], -1, -1).half()",
                "visual_ctx = shared_ctx.expand(x.shape[0], -1, -1).type(x.dtype)",
                same,
            ),
        ],
        "trainers.maple": [
            (
                "self.proj = nn.Linear(ctx_dim, 768)",
                "self.proj = nn.Linear(ctx_dim, clip_model.visual.conv1.out_channels)",
                "the image encoder's width (768 in ViT-B/16)",
            ),
            (
                "self.proj.half()",
                "self.proj.to(dtype)",
                "the model's precision (fp16 in the original, fp32 here)",
            ),
            (
                "nn.Parameter(torch.empty(n_ctx, 512))",
                "nn.Parameter(torch.empty(n_ctx, ctx_dim))",
                "the text encoder's width (512 in ViT-B/16)",
            ),
            (
                "single_layer = nn.Linear(ctx_dim, 768)",
                "single_layer = nn.Linear(ctx_dim, clip_model.visual.conv1.out_channels)",
                "the image encoder's width (768 in ViT-B/16)",
            ),
        ],
    }


class PatchedSource(importlib.abc.MetaPathFinder):
    """Imports the named modules from the first of `roots` that holds them, with their PATCHES
    applied (never from a bytecode cache of the unpatched file)."""

    def __init__(self, roots: list[Path], replacements: dict[str, list[tuple[str, str, str]]]) -> None:
        self.roots, self.replacements = roots, replacements

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 (importlib's protocol)
        if name not in self.replacements:
            return None
        file = next(f for root in self.roots if (f := root / (name.replace(".", "/") + ".py")).is_file())
        return importlib.util.spec_from_file_location(name, file, loader=PatchedLoader(name, file, self))


class PatchedLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, name: str, file: Path, finder: PatchedSource) -> None:
        super().__init__(name, str(file))
        self.finder = finder

    def get_code(self, fullname: str):  # noqa: ANN201
        source = Path(self.path).read_text()
        for old, new, why in self.finder.replacements[fullname]:
            if source.count(old) != 1:
                raise SystemExit(
                    f"error: {self.path} holds {old!r} {source.count(old)} times, not once ({why})"
                )
            source = source.replace(old, new)
        return compile(source, self.path, "exec")


def write_digits_split(image_dir: Path, split_file: Path) -> None:
    """The project's digits split (its reader's lists, in their order) as a split_zhou_*.json file,
    paths relative to the project's rendered images."""
    splits = ProjectDigits(image_dir).read()
    data = {
        key: [[Path(s.path).relative_to(image_dir).as_posix(), s.label, s.classname] for s in items]
        for key, items in (("train", splits.train), ("val", splits.val), ("test", splits.test))
    }
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text(json.dumps(data))


def register_digits(image_dir: Path) -> None:
    """The digits as a Dassl dataset, made as the official EuroSAT class (without its pickle of the
    few-shot subsets, which later runs would read back: this run draws them)."""
    from dassl.data.datasets import DATASET_REGISTRY, DatasetBase
    from datasets.oxford_pets import OxfordPets

    @DATASET_REGISTRY.register()
    class Digits(DatasetBase):
        dataset_dir = "digits"

        def __init__(self, cfg) -> None:  # noqa: ANN001
            root = os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT))
            split_path = os.path.join(root, self.dataset_dir, "split_digits.json")
            train, val, test = OxfordPets.read_split(split_path, str(image_dir))
            num_shots = cfg.DATASET.NUM_SHOTS
            if num_shots >= 1:
                train = self.generate_fewshot_dataset(train, num_shots=num_shots)
                val = self.generate_fewshot_dataset(val, num_shots=min(num_shots, 4))
            train, val, test = OxfordPets.subsample_classes(
                train, val, test, subsample=cfg.DATASET.SUBSAMPLE_CLASSES
            )
            super().__init__(train_x=train, val=val, test=test)


def load_tiny_clip(cfg):  # noqa: ANN001, ANN201
    """The official load_clip_to_cpu with the project's shipped weights for OpenAI's file: the
    official `clip.build_model` (random init, fp16 conversion, then the weights) from their state dict."""
    from clip import clip

    design_details = {
        "trainer": "MaPLe",
        "vision_depth": 0,
        "language_depth": 0,
        "vision_ctx": 0,
        "language_ctx": 0,
        "maple_length": cfg.TRAINER.MAPLE.N_CTX,
    }
    return clip.build_model(load_file(str(WEIGHTS)), design_details)


def learned(learner: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The official prompt learner's learned tensors under the project's names."""
    state = {name: p.detach().clone().float() for name, p in learner.named_parameters()}
    return {
        mine: torch.stack([state[n] for n in theirs]) if mine == "deep_text" else state[theirs[0]]
        for mine, theirs in OFFICIAL_NAMES.items()
    }


def run_official(maple: Path, dassl_dir: Path, image_dir: Path, work: Path) -> dict:
    """Runs the official train.py; returns its few-shot images, losses, prompts and test accuracy."""
    config = json.loads((Path(CONFIG_DIR) / f"{MODEL}.json").read_text())
    put_on_path(maple, dassl_dir)
    torch_compat()
    sys.meta_path.insert(0, PatchedSource([maple, dassl_dir], patches(config)))
    import dassl.engine
    import trainers.maple

    register_digits(image_dir)
    write_digits_split(image_dir, work / "digits" / "split_digits.json")
    trainers.maple.load_clip_to_cpu = load_tiny_clip

    record: dict = {"losses": [], "init": None, "test_acc": None}
    build = dassl.engine.build_trainer

    def build_and_watch(cfg):  # noqa: ANN001, ANN202
        trainer = build(cfg)
        record["trainer"] = trainer
        record["init"] = learned(trainer.model.prompt_learner)
        test = trainer.test

        def recorded_test(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            record["test_acc"] = test(*args, **kwargs)
            return record["test_acc"]

        trainer.test = recorded_test
        return trainer

    step = trainers.maple.MaPLe.forward_backward

    def recorded_step(self, batch):  # noqa: ANN001, ANN202
        summary = step(self, batch)
        record["losses"].append(summary["loss"])
        return summary

    dassl.engine.build_trainer = build_and_watch
    trainers.maple.MaPLe.forward_backward = recorded_step
    sys.argv = [
        "train.py",
        "--root", str(work),
        "--seed", str(SEED),
        "--trainer", "MaPLe",
        "--config-file", str(maple / "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"),
        "--output-dir", str(work / "output"),
        "DATASET.NAME", "Digits",
        "DATASET.NUM_SHOTS", str(SHOTS),
        "DATASET.SUBSAMPLE_CLASSES", "all",
        "INPUT.TRANSFORMS", str(TRANSFORMS),
        "INPUT.SIZE", f"({IMAGE_SIZE}, {IMAGE_SIZE})",
        "INPUT.RRCROP_SCALE", str(CROP_SCALE),
        "DATALOADER.NUM_WORKERS", "0",
        "USE_CUDA", "False",
        "MODEL.BACKBONE.NAME", MODEL,
        "TRAINER.MAPLE.PREC", "fp32",
        "TRAINER.MAPLE.N_CTX", str(N_CTX),
        "TRAINER.MAPLE.PROMPT_DEPTH", str(DEPTH),
    ]  # fmt: skip
    # Dassl's logger stays sys.stdout (it closes the console when dropped)
    runpy.run_path(str(maple / "train.py"), run_name="__main__")
    trainer = record.pop("trainer")
    dataset = trainer.dm.dataset

    def images(items) -> list:  # noqa: ANN001
        return [[Path(d.impath).relative_to(image_dir).as_posix(), d.label] for d in items]

    record["fewshot"] = {"train": images(dataset.train_x), "val": images(dataset.val)}
    record["final"] = learned(trainer.model.prompt_learner)
    record["official"] = {
        "maple": {"commit": check_commit(maple, MAPLE_COMMIT, True), "pinned": MAPLE_COMMIT},
        "dassl": {"commit": check_commit(dassl_dir, DASSL_COMMIT, True), "pinned": DASSL_COMMIT},
        "patches": [
            [module, old, new, why] for module, items in patches(config).items() for old, new, why in items
        ],
        "argv": [arg.replace(str(work), "<work>") for arg in sys.argv[1:]],
    }
    return record


def save(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{stage}.{k}": v.contiguous() for stage in ("init", "final") for k, v in record[stage].items()
    }
    save_file(tensors, str(out.with_suffix(".safetensors")))
    meta = {k: v for k, v in record.items() if k not in ("init", "final")}
    meta["settings"] = {"model": MODEL, "shots": SHOTS, "seed": SEED, "prompt_depth": DEPTH, "n_ctx": N_CTX}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")


def project_overrides(cache_dir: Path, run_dir: Path) -> list[str]:
    """The project's run of the same recipe (what tests/test_maple_whole_run.py runs in-process)."""
    return [
        "experiment=quickstart",
        "method=maple",
        "model=tiny_pretrained",
        f"method.module.prompt_depth={DEPTH}",
        f"ctx.n_ctx={N_CTX}",
        f"shots={SHOTS}",
        f"seed={SEED}",
        "baseline=null",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
    ]


def compare_with_project(record: dict, cache_dir: Path, run_dir: Path) -> dict:
    """Runs the project's side and prints and returns the comparison."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "src.train", *project_overrides(cache_dir, run_dir)]
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    results = json.loads((run_dir / "results.json").read_text())
    prompt = torch.load(run_dir / "prompt.pt", weights_only=True)
    mine = {"ctx": prompt["ctx"], **prompt["weights"]}
    fewshot = json.loads((run_dir / "fewshot.json").read_text())
    differences = {k: float((mine[k].float() - v).abs().max()) for k, v in record["final"].items()}
    # the official run's own checkpoint (Dassl's save_model wrote it), read as a released prompt and
    # tested by the project's src.eval, as tests/test_maple_whole_run.py does with its copy
    released = run_dir.parent / "released"
    command = [sys.executable, "-m", "src.eval", f"ckpt={run_dir.parent / 'output'}", "model=tiny_pretrained"]
    command += [
        "dataset=digits",
        "data.num_workers=0",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={released}",
    ]
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    released_results = released / "results.json"
    comparison = {
        "official_checkpoint_test_acc_here": json.loads(released_results.read_text())["test_acc"],
        "same_train_images": [p[:2] for p in fewshot["train"]] == record["fewshot"]["train"],
        "same_val_images": [p[:2] for p in fewshot["val"]] == record["fewshot"]["val"],
        "official_test_acc": record["test_acc"],
        "project_test_acc": results["test_acc"],
        "max_prompt_difference": max(differences.values()),
        "prompt_differences": differences,
    }
    print(json.dumps(comparison, indent=1))
    return comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "maple", type=Path, help=f"a git checkout of multimodal-prompt-learning at {MAPLE_COMMIT[:7]}"
    )
    parser.add_argument(
        "--dassl", type=Path, required=True, help=f"a git checkout of Dassl.pytorch at {DASSL_COMMIT[:7]}"
    )
    parser.add_argument(
        "--any-commit", action="store_true", help="run other commits than the ones the fixture is from"
    )
    default_cache = Path(os.environ.get("COOP_CACHE", Path.home() / ".cache" / "coop"))
    parser.add_argument("--cache-dir", type=Path, default=default_cache, help="the project's paths.cache_dir")
    parser.add_argument("--out", type=Path, default=FIXTURE, help="writes OUT.json and OUT.safetensors")
    parser.add_argument(
        "--checkpoint-out",
        type=Path,
        default=DASSL_FIXTURES / "maple",
        help="a copy of the run's Dassl output",
    )
    parser.add_argument("--project", action="store_true", help="also run the project's side and compare")
    args = parser.parse_args()
    for folder, pinned in ((args.maple, MAPLE_COMMIT), (args.dassl, DASSL_COMMIT)):
        check_commit(folder, pinned, args.any_commit)
    torch.set_num_threads(2)
    image_dir = args.cache_dir / "digits"  # where the project renders the digits (dataset=digits)
    with tempfile.TemporaryDirectory() as work:
        record = run_official(args.maple.resolve(), args.dassl.resolve(), image_dir, Path(work))
        save(record, args.out)
        # the run's own checkpoint, as Dassl's save_model wrote it (the prompt learner and the
        # encoders its CustomCLIP holds), for tests/test_maple_whole_run.py
        shutil.rmtree(args.checkpoint_out, ignore_errors=True)
        shutil.copytree(
            Path(work) / "output" / "MultiModalPromptLearner", args.checkpoint_out / "MultiModalPromptLearner"
        )
        print(
            f"official: test accuracy {record['test_acc']:.2f} %; written to {args.out}.{{json,safetensors}} "
            f"and {args.checkpoint_out}"
        )
        if args.project:
            compare_with_project(record, args.cache_dir, Path(work) / "project")


if __name__ == "__main__":
    main()
