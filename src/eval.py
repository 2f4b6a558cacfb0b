"""Evaluate a saved prompt on any dataset's test split.

python -m src.eval ckpt=outputs/imagenet/coop/.../prompt.pt dataset=imagenetv2
python -m src.eval ckpt=outputs/oxford_pets_base/.../prompt.pt dataset=oxford_pets dataset.subsample=new
python -m src.eval ckpt=[.../seed1/prompt.pt,.../seed2/prompt.pt] ensemble=features dataset=dtd

The backbone is the one the prompt was learned on. A unified context is rebuilt on the dataset's
class names (other classes: domain generalisation, cross-dataset, new classes); a class-specific
one only exists for the classes it was trained on. `ckpt=` is a training run's folder, its prompt.pt
or its checkpoints/last.ckpt (an unfinished run); results go to eval/<dataset>/ in that run folder.
Several prompt files (a list) are tested as one ensemble (src/models/prompt_ensemble.py), reported
as the method `<method>_ensemble`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

import src.train  # noqa: F401  (registers the resolvers that conf/ uses)
from src.cli import run
from src.files import write_json
from src.models.clip import FrozenCLIP
from src.models.cocoop import cocoop_from_prompt
from src.models.coop import CoOp, coop_from_prompt, load_prompt, run_folder
from src.models.maple import maple_from_prompt
from src.models.prompt_ensemble import PromptEnsemble, prompts_images
from src.models.tip_adapter import tip_adapter_from_prompt
from src.quiet import silence_known_warnings
from src.results import evaluation_fields

log = logging.getLogger(__name__)

# How each method's prompt file is turned back into its module (prompt_state()["method"]).
PROMPT_LOADERS = {
    "coop": coop_from_prompt,
    "cocoop": cocoop_from_prompt,
    "kgcoop": coop_from_prompt,  # a CoOp context: the regulariser only acts in training
    "prograd": coop_from_prompt,  # likewise the gradient projection
    "tip_adapter": tip_adapter_from_prompt,
    "tip_adapter_f": tip_adapter_from_prompt,
    "maple": maple_from_prompt,
}


def prompt_paths(ckpt: str | ListConfig | list) -> list[str]:
    """`ckpt=<prompt>` or, for an ensemble, `ckpt=[<prompt>,<prompt>,...]`."""
    paths = [str(p) for p in ckpt] if isinstance(ckpt, (ListConfig, list)) else [str(ckpt)]
    if not paths:
        raise ValueError("ckpt=[]: give a prompt.pt, or a list of them for an ensemble")
    return paths


def prompt_field(path: str | ListConfig, field: str) -> Any:
    """A field of a prompt file (of the first, for an ensemble), for the config (model=from_ckpt
    reads the backbone from it)."""
    return load_prompt(prompt_paths(path)[0])[field]


def ensemble_suffix(ckpt: str | ListConfig, mode: str) -> str:
    """The evaluation folder's suffix: none for one prompt file, `_ensemble<n>_<mode>` for a list."""
    return f"_ensemble{len(ckpt)}_{mode}" if isinstance(ckpt, (ListConfig, list)) else ""


OmegaConf.register_new_resolver("prompt_field", prompt_field, replace=True)
# Outputs "beside the prompt" go to the run folder, whether ckpt= names it, its prompt.pt or its
# last.ckpt (the first prompt's, for an ensemble).
OmegaConf.register_new_resolver("run_dir", lambda path: str(run_folder(prompt_paths(path)[0])), replace=True)
OmegaConf.register_new_resolver("ensemble_suffix", ensemble_suffix, replace=True)


def module_from_prompt(state: dict[str, Any], clip: FrozenCLIP, classnames: list[str]) -> CoOp:
    return PROMPT_LOADERS[state.get("method", "coop")](state, clip, classnames)


def training_results(ckpt: str | Path) -> dict[str, Any]:
    """The results.json of the run that wrote the prompt, if it has one (a finished run)."""
    path = run_folder(ckpt) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Tests the prompt `cfg.ckpt` (or the ensemble of a list of them) on the test split of
    `cfg.dataset`; writes results.json."""
    silence_known_warnings()
    out = Path(cfg.paths.output_dir)
    paths = prompt_paths(cfg.ckpt)
    states = [load_prompt(path) for path in paths]
    state = states[0]
    pl.seed_everything(cfg.seed, workers=True)
    clip = instantiate(cfg.model)
    datamodule = instantiate(
        cfg.data,
        dataset=instantiate(cfg.dataset.reader),
        image_size=clip.image_size,
    )
    members = [module_from_prompt(s, clip, datamodule.classnames) for s in states]
    if any(prompts_images(member) for member in members):
        datamodule.cache = None  # their image features depend on their prompts: never read from the cache
    ensemble = isinstance(cfg.ckpt, ListConfig)
    module = PromptEnsemble(members, len(datamodule.classnames), cfg.ensemble) if ensemble else members[0]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)

    sources = [training_results(path) for path in paths]
    source = sources[0]
    method = state.get("method", "coop")
    seeds = [s.get("seed") for s in sources]
    results = {
        "dataset": cfg.dataset.name,
        "subsample": cfg.dataset.subsample,
        "method": method,
        "ckpt": str(cfg.ckpt),
        "trained_on": source.get("dataset"),
        "trained_subsample": source.get("subsample"),
        "shots": source.get("shots"),
        "seed": source.get("seed"),
        "label_noise": source.get("label_noise", 0.0),
        "ctx": "class_specific" if state["class_specific"] else "unified",
        "n_ctx": state["n_ctx"],
        "ctx_init": state.get("ctx_init"),
        "ctx_init_count": state.get("ctx_init_count", "tokens") if state.get("ctx_init") else None,
        "class_token_position": state["class_token_position"],
        **evaluation_fields(clip, datamodule, trainer, metrics),
    }
    if ensemble:
        methods = {s.get("method", "coop") for s in states}
        results |= {
            "method": f"{method if len(methods) == 1 else 'prompt'}_ensemble",
            "ckpt": paths,
            "ensemble": cfg.ensemble,
            "members": [s.get("method", "coop") for s in states],
            "member_seeds": seeds,
            # members of one seed (inits, positions) are a run of that seed; of several, of none
            "seed": seeds[0] if len(set(seeds)) == 1 else 0,
        }
    if trainer.is_global_zero:
        write_json(out / "results.json", results)
        log.info("%s: test accuracy %.2f%%; results in %s", cfg.dataset.name, results["test_acc"], out)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["test_acc"]


if __name__ == "__main__":
    run(main)
