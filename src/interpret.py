"""What a learned context says in words: the nearest vocabulary tokens of each context vector.

python -m src.interpret ckpt=outputs/textile/coop/coop-tiny_unified_m16_end/shots16/seed1/prompt.pt topk=5

`ckpt=` is a training run's folder, its prompt.pt or its checkpoints/last.ckpt; nearest_words.json
goes to that run folder (or `out=`).

Distances are Euclidean, in the token-embedding table of the backbone the prompt was learned on, as
in the paper's interpretation of the learned prompts. Learned vectors need not lie near any word:
the distances say how much the words can be trusted. Unified contexts give one list per position,
class-specific contexts one per class and position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

import src.run.config  # noqa: F401  (the resolvers of conf/)
from src.common.files import check_output, write_json
from src.common.prompt_file import is_released, read_saved
from src.methods.base import prompt_method_class
from src.models.clip import FrozenCLIP
from src.run.cli import run, task
from src.run.saved_prompt import as_prompt

log = logging.getLogger(__name__)


def nearest_tokens(
    vectors: torch.Tensor, table: torch.Tensor, topk: int, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and row indices [n, topk] of the `topk` rows of `table` [V, d] nearest to each of
    `vectors` [n, d], nearest first."""
    table = table.float()
    table_sq = table.square().sum(1)
    distances, indices = [], []
    for part in vectors.float().split(chunk):
        # ranked by |t|^2 - 2 v.t (a matrix product), then the exact distances of the chosen rows
        _, idx = (table_sq - 2 * part @ table.T).topk(topk, dim=1, largest=False)
        dist = torch.linalg.vector_norm(part[:, None] - table[idx], dim=-1)
        dist, order = dist.sort(dim=1)
        distances.append(dist)
        indices.append(idx.gather(1, order))
    return torch.cat(distances), torch.cat(indices)


def token_decoder(tokenizer: Any) -> Callable[[int], str]:
    """Token id -> its text (open_clip's SimpleTokenizer; its HF wrapper keeps the decoder inside)."""
    decode = getattr(tokenizer, "decode", None) or tokenizer.tokenizer.decode

    def text(token_id: int) -> str:
        word = decode([token_id])
        return word.strip() or repr(word)  # a whitespace or control-character token stays visible

    return text


def interpret(state: dict[str, Any], clip: FrozenCLIP, topk: int = 5) -> dict[str, Any]:
    """The nearest words of every context vector of a prompt file's state, as JSON-ready data."""
    table = clip.token_embedding.weight.detach()
    ctx = state["ctx"]
    if ctx.shape[-1] != table.shape[1]:
        raise ValueError(
            f"the context has width {ctx.shape[-1]}, the token embedding of {clip.name} {table.shape[1]}: "
            f"interpret the prompt with the backbone it was learned on ({state['backbone']})"
        )
    topk = min(topk, table.shape[0])
    contexts = ctx if state["class_specific"] else ctx[None]
    names = state["classnames"] if state["class_specific"] else [None]
    distances, ids = nearest_tokens(contexts.reshape(-1, ctx.shape[-1]), table, topk)
    distances = distances.view(*contexts.shape[:2], topk).tolist()
    ids = ids.view(*contexts.shape[:2], topk).tolist()
    decode = token_decoder(clip.tokenizer)
    entries = []
    for name, context_ids, context_distances in zip(names, ids, distances, strict=True):
        vectors = [
            {
                "position": position,
                "nearest": [
                    {"word": decode(i), "token_id": i, "distance": d}
                    for i, d in zip(row_ids, row_d, strict=True)
                ],
            }
            for position, (row_ids, row_d) in enumerate(zip(context_ids, context_distances, strict=True), 1)
        ]
        entries.append(
            {
                "classname": name,
                "nearest_prompt": " ".join(v["nearest"][0]["word"] for v in vectors),
                "vectors": vectors,
            }
        )
    return {
        "backbone": state["backbone"],
        "pretrained": state["pretrained"],
        "class_specific": state["class_specific"],
        "n_ctx": state["n_ctx"],
        "topk": topk,
        "contexts": entries,
    }


def words_table(words: dict[str, Any]) -> Table:
    table = Table()
    if words["class_specific"]:
        table.add_column("class")
    table.add_column("#", justify="right")
    table.add_column(f"nearest words (distance), top {words['topk']}")
    for context in words["contexts"]:
        for vector in context["vectors"]:
            cells = [
                str(vector["position"]),
                ", ".join(f"{n['word']} ({n['distance']:.3f})" for n in vector["nearest"]),
            ]
            if words["class_specific"]:
                cells.insert(0, context["classname"] if vector["position"] == 1 else "")
            table.add_row(*cells, end_section=vector is context["vectors"][-1])
    return table


def interpret_file(cfg: DictConfig) -> dict[str, Any]:
    """Interprets `cfg.ckpt`, prints the table and writes the JSON to `cfg.out`."""
    state = read_saved(cfg.ckpt)
    if not is_released(state):  # every original's learns a context
        method = prompt_method_class(state, cfg.ckpt)
        if not method.learns_context:
            raise ValueError(
                f"ckpt={cfg.ckpt}: method {state['method']!r} learns no prompt context, so there are no "
                "context vectors to read as words; give the prompt of a method such as coop"
            )
    check_output(cfg.out, "out")
    pl.seed_everything(cfg.seed, verbose=False)  # a random-weight backbone is a function of the seed
    clip = instantiate(cfg.model)
    state = as_prompt(state, clip, None, cfg)  # a Dassl checkpoint: on its trained classes
    words = {"ckpt": str(cfg.ckpt), **interpret(state, clip, cfg.topk)}
    console = Console()
    console.print(f"{cfg.ckpt} ({clip.name}, {clip.pretrained or 'random weights'})")
    console.print(words_table(words))
    for context in words["contexts"]:
        prefix = f"{context['classname']}: " if context["classname"] is not None else ""
        log.info("%snearest words: %s", prefix, context["nearest_prompt"])
    path = write_json(Path(cfg.out), words)
    log.info("written to %s", path)
    return words


@hydra.main(version_base="1.3", config_path="../conf", config_name="interpret")
@task
def main(cfg: DictConfig) -> None:
    interpret_file(cfg)


if __name__ == "__main__":
    run(main)
