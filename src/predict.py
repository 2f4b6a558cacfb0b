"""Class probabilities of your own images under a learned prompt.

python -m src.predict ckpt=outputs/textile/.../seed1/prompt.pt input=photos/ topk=3

`ckpt=` is a training run's folder, its prompt.pt or its checkpoints/last.ckpt; predictions.csv goes
to that run folder (or `out=`).

Each image goes through the paper's test transform at the backbone's input size; the probabilities
are the softmax of the method's logits over the prompt's classes. The `topk` most probable classes
of every image are printed and written as CSV (path, class_1, prob_1, ..., class_k, prob_k). Images
that cannot be read are listed, counted and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.table import Table

import src.run.config  # noqa: F401  (the resolvers of conf/)
from src.common.files import atomic_write, check_output
from src.common.prompt_file import read_saved
from src.data.datasets.base import IMAGE_SUFFIXES
from src.data.transforms import eval_transform
from src.methods.base import Method, method_from_prompt
from src.run.cli import run, task
from src.run.saved_prompt import as_prompt

log = logging.getLogger(__name__)

# What PIL raises for a file that is not an image it can decode (or one too large to be safe).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def image_files(path: str | Path) -> list[Path]:
    """`path` itself if it is a file, else the image files under it (by suffix, recursively), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input={path}: no such file or folder; give an image or a folder of images")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(
            f"input={path}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "give an image or a folder of images"
        )
    return files


def predict_probabilities(
    module: Method, files: list[Path], batch_size: int = 32, device: str | torch.device = "cpu"
) -> tuple[list[Path], torch.Tensor, dict[Path, str]]:
    """Probabilities [n, n_classes] of the readable `files` (returned in the same order), and the
    unreadable ones with the reason."""
    module.eval().to(device)
    transform = eval_transform(module.clip.image_size)
    done: list[Path] = []
    probabilities: list[torch.Tensor] = []
    unreadable: dict[Path, str] = {}
    module.on_test_epoch_start()  # the prompts' text features, once for all batches
    try:
        for batch_files, images in _batches(files, transform, batch_size, unreadable):
            with torch.no_grad():
                logits = module(images.to(device))
            probabilities.append(logits.float().softmax(dim=-1).cpu())
            done += batch_files
    finally:
        module.on_test_epoch_end()
    classes = len(module.classnames)
    return done, torch.cat(probabilities) if probabilities else torch.empty(0, classes), unreadable


def _batches(
    files: list[Path], transform, batch_size: int, unreadable: dict[Path, str]
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    batch_files: list[Path] = []
    images: list[torch.Tensor] = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(transform(image))
            batch_files.append(file)
        except UNREADABLE as err:
            unreadable[file] = str(err) or type(err).__name__
            log.warning("skipped %s: cannot read it as an image (%s)", file, unreadable[file])
        if len(images) == batch_size:
            yield batch_files, torch.stack(images)
            batch_files, images = [], []
    if images:
        yield batch_files, torch.stack(images)


def top_classes(
    files: list[Path], probabilities: torch.Tensor, classnames: list[str], topk: int
) -> pd.DataFrame:
    """One row per image: path, class_1, prob_1, ..., class_k, prob_k (most probable first)."""
    topk = min(topk, len(classnames))
    values, indices = probabilities.topk(topk, dim=1)
    columns: dict[str, Any] = {"path": [str(f) for f in files]}
    for rank in range(topk):
        columns[f"class_{rank + 1}"] = [classnames[i] for i in indices[:, rank].tolist()]
        columns[f"prob_{rank + 1}"] = values[:, rank].tolist()
    return pd.DataFrame(columns)


def predictions_table(predictions: pd.DataFrame, folder: Path | None = None) -> Table:
    """The predictions as a table, with image paths relative to `folder` when given."""
    table = Table()
    table.add_column("image")
    table.add_column("most probable classes")
    ranks = (len(predictions.columns) - 1) // 2
    for row in predictions.itertuples(index=False):
        values = row[1:]
        name = Path(row.path).relative_to(folder).as_posix() if folder else row.path
        table.add_row(
            name, "\n".join(f"{values[2 * r]} ({100 * values[2 * r + 1]:.1f}%)" for r in range(ranks))
        )
    return table


def predict(cfg: DictConfig) -> pd.DataFrame:
    """Predicts the classes of `cfg.input`, prints them and writes the CSV `cfg.out`."""
    files = image_files(cfg.input)
    state = read_saved(cfg.ckpt)
    check_output(cfg.out, "out")
    pl.seed_everything(cfg.seed, verbose=False)  # a random-weight backbone is a function of the seed
    clip = instantiate(cfg.model)
    state = as_prompt(state, clip, None, cfg)  # a Dassl checkpoint: on its trained classes
    module = method_from_prompt(state, clip, state["classnames"], cfg.ckpt)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    done, probabilities, unreadable = predict_probabilities(module, files, cfg.batch_size, device)
    if not done:
        first, reason = next(iter(unreadable.items()))
        raise ValueError(
            f"input={cfg.input}: none of the {len(files)} images could be read (e.g. {first}: {reason}); "
            "give image files PIL can open"
        )
    predictions = top_classes(done, probabilities, state["classnames"], cfg.topk)
    folder = Path(cfg.input) if Path(cfg.input).is_dir() else None
    Console().print(predictions_table(predictions, folder))
    if unreadable:
        log.warning(
            "%d of %d images could not be read and were skipped: %s",
            len(unreadable),
            len(files),
            ", ".join(str(f) for f in unreadable),
        )
    text = predictions.to_csv(index=False)
    path = atomic_write(cfg.out, lambda f: f.write(text.encode()))
    log.info("%d predictions written to %s", len(predictions), path)
    return predictions


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@task
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    run(main)
