"""An evaluation run: a saved method (a prompt file, or an ensemble of them) tested on a dataset's
test split; results.json in eval/<dataset>/ of the prompt's run folder. The command is src/eval.py.

The backbone is the one the prompt was learned on. A unified context is rebuilt on the dataset's
class names (other classes: domain generalisation, cross-dataset, new classes); a class-specific
one only exists for the classes it was trained on. A prompt the original code published (a Dassl
checkpoint: src/run/saved_prompt.py) is tested on the backbone `model=` names. Several prompt
files (a list) are tested as one ensemble (src/methods/prompt_ensemble.py), reported as the method
`<method>_ensemble`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from src.common.files import write_json
from src.common.messages import override
from src.common.prompt_file import is_released, read_saved
from src.methods.base import method_from_prompt, prompt_method_class
from src.methods.prompt_ensemble import PromptEnsemble
from src.run.backbone import image_encoder
from src.run.config import prompt_paths
from src.run.logs import silence_known_warnings
from src.run.results import evaluation_fields, method_fields, training_results
from src.run.saved_prompt import as_prompt

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Tests the prompt `cfg.ckpt` (or the ensemble of a list of them) on the test split of
    `cfg.dataset`; writes results.json."""
    silence_known_warnings()
    out = Path(cfg.paths.output_dir)
    paths = prompt_paths(cfg.ckpt)
    states = [read_saved(path) for path in paths]
    datamodule = instantiate(cfg.data, dataset=instantiate(cfg.dataset.reader))
    classnames = datamodule.classnames
    for state, path in zip(states, paths, strict=True):  # before any weights load
        if not is_released(state):
            check_classes(state, path, classnames, cfg)
    pl.seed_everything(cfg.seed, workers=True)
    clip = instantiate(cfg.model)
    released = [is_released(state) for state in states]
    states = [as_prompt(state, clip, classnames, cfg) for state in states]  # the original code's, rebuilt
    for state, path, was_released in zip(states, paths, released, strict=True):
        if was_released:
            check_classes(state, path, classnames, cfg)
    members = [
        method_from_prompt(s, clip, classnames, path, transfer_template(s, cfg))
        for s, path in zip(states, paths, strict=True)
    ]
    if any(member.needs_images for member in members):
        datamodule.cache = None  # their image features depend on their prompts: never read from the cache
    ensemble = isinstance(cfg.ckpt, ListConfig)
    module = PromptEnsemble(members, cfg.ensemble) if ensemble else members[0]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    datamodule.use_encoder(image_encoder(clip, trainer))
    (metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)

    sources = [training_results(path) for path in paths]
    source = sources[0]
    seeds = [s.get("seed") for s in sources]
    results = {
        "dataset": cfg.dataset.name,
        "subsample": cfg.dataset.subsample,
        "ckpt": str(cfg.ckpt),
        "trained_on": source.get("dataset"),
        "trained_subsample": source.get("subsample"),
        "shots": source.get("shots"),
        "seed": source.get("seed"),
        "label_noise": source.get("label_noise", 0.0),
        **evaluation_fields(clip, datamodule, trainer, metrics),
        **method_fields(members[0]),
    }
    if ensemble:
        methods = {member.name for member in members}
        results |= {
            **module.contract_fields(),  # an ensemble's, not its first member's
            "method": f"{members[0].name if len(methods) == 1 else 'prompt'}_ensemble",
            "ckpt": paths,
            "ensemble": cfg.ensemble,
            "members": [member.name for member in members],
            "member_seeds": seeds,
            # members of one seed (inits, positions) are a run of that seed; of several, of none
            "seed": seeds[0] if len(set(seeds)) == 1 else 0,
        }
    if trainer.is_global_zero:
        write_json(out / "results.json", results)
        log.info("%s: test accuracy %.2f%%; results in %s", cfg.dataset.name, results["test_acc"], out)
    return results


def check_classes(state: dict[str, Any], path: str, classnames: list[str], cfg: DictConfig) -> None:
    """A prompt whose weights are one per trained class (`Method.transfers_for`) is tested on those
    classes only: on another class list, one line before anything loads."""
    if list(classnames) == list(state["classnames"]):
        return
    refusal = prompt_method_class(state, path).transfer_refusal(state)
    if refusal is not None:
        trained = state.get("trained_on") or {}
        where = f" of {trained['dataset']}" if trained.get("dataset") else ""
        if trained.get("subsample", "all") != "all":
            where += f", {override('dataset.subsample', trained['subsample'])}"
        raise ValueError(
            f"ckpt={path}: {state['method']}: {refusal} ({len(state['classnames'])} classes{where}), not "
            f"the {len(classnames)} classes of dataset={cfg.dataset.name} "
            f"({override('dataset.subsample', cfg.dataset.subsample)}): test it on those classes, or "
            "train a method that transfers (a unified context)"
        )


def transfer_template(state: dict[str, Any], cfg: DictConfig) -> str | None:
    """The tested dataset's hand-made template for a prompt trained on another dataset (a method
    whose prompts are made from it takes it there, as MMRL's official code); None on the dataset it
    was trained on, where the method keeps its own."""
    trained_on = state.get("trained_on") or {}
    return None if trained_on.get("dataset") == cfg.dataset.name else cfg.dataset.get("template")
