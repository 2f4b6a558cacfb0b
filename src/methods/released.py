"""The original repositories' trained prompts as this project's methods, and this project's back as
theirs: the state dicts of their Dassl checkpoints (src/common/dassl_checkpoint.py reads and writes
the files) against the methods' parameters.

What each original saves (the model it registers with Dassl, and that model's state dict):

- coop, prograd (KaiyangZhou/CoOp `CoOp`, BeierZhu/Prompt-align `ProGrad`): model `prompt_learner`,
  `ctx`;
- cocoop (KaiyangZhou/CoOp `CoCoOp`): model `prompt_learner`, `ctx`, `meta_net.linear{1,2}.*`;
- kgcoop (htyao89/KgCoOp `KgCoOp`): model `prompt_learner`, `ctx` (and `bias_vectors` and
  `meta_net.linear1.*`, which never train);
- maple (muzairkhattak/multimodal-prompt-learning `MaPLe`): model `MultiModalPromptLearner`, the
  whole prompted CLIP: `prompt_learner.ctx`, `prompt_learner.proj.*` (the first coupling),
  `prompt_learner.compound_prompts_text.<i>`, `prompt_learner.compound_prompt_projections.<i>.*`;
- ivlp, promptsrc (muzairkhattak/PromptSRC `IVLP`, `PromptSRC`): model `VLPromptLearner`, the whole
  prompted CLIP: `prompt_learner.ctx`, `text_encoder.transformer.resblocks.<i>.VPT_shallow` (deep
  text prompts), `image_encoder.VPT` (the image prompts at the input) and
  `image_encoder.transformer.resblocks.<i>.VPT_shallow` (deep image prompts); PromptSRC's also
  holds its frozen teacher, `prompt_learner.ZS_image_encoder.*`.

Each also saves its prompt learner's token_prefix and token_suffix buffers (the SOS embedding, and
the embeddings of the words after the context: the class name, "." and EOS, with any fixed words
of the context's phrase first), which its `load_model` deletes, builds again from the dataset's
class names, and loads the rest with `strict=False`. Here the saved ones are read too: they tell
which backbone the prompt was learned on (they must be rows of its token embedding), the fixed
words after the context (MaPLe's default learns "a photo" of "a photo of a" and keeps "of a") and
the class names it was trained on.

The files do not say the backbone, the CoOp class-token position (end is taken: every released
prompt's), nor, for CoOp's and ProGrad's identical tensors, which of the two wrote them: the
backbone is `model=`, the method `method=` where the tensors do not tell.
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

import torch

from src.common.dassl_checkpoint import FIX
from src.common.prompt_file import PROMPT_FORMAT
from src.methods.base import Method, class_path, import_method
from src.methods.cocoop import CoCoOp
from src.methods.coop import CoOp
from src.methods.ivlp import IVLP, DeepPrompts
from src.methods.maple import MaPLe
from src.methods.prograd import template_words, word_count
from src.models.clip import FrozenCLIP

log = logging.getLogger(__name__)

# The project's methods whose original code publishes Dassl checkpoints: class, and Dassl model name.
RELEASED = {
    "coop": ("src.methods.coop.CoOp", "prompt_learner"),
    "cocoop": ("src.methods.cocoop.CoCoOp", "prompt_learner"),
    "kgcoop": ("src.methods.kgcoop.KgCoOp", "prompt_learner"),
    "prograd": ("src.methods.prograd.ProGrad", "prompt_learner"),
    "maple": ("src.methods.maple.MaPLe", "MultiModalPromptLearner"),
    "ivlp": ("src.methods.ivlp.IVLP", "VLPromptLearner"),
    "promptsrc": ("src.methods.promptsrc.PromptSRC", "VLPromptLearner"),
}
METHOD_KEY = "method"  # what this project adds to the checkpoints it writes: the method's name

PL = "prompt_learner."  # the prompt learner's keys in a state dict of the whole prompted CLIP
MAPLE_TEXT = re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$")
MAPLE_PROJ = re.compile(r"^prompt_learner\.compound_prompt_projections\.(\d+)\.(weight|bias)$")
TEXT_DEEP = re.compile(r"^text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
IMAGE_DEEP = re.compile(r"^image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
IMAGE_INPUT = "image_encoder.VPT"


def infer_method(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The method whose original code writes these keys; None for CoOp's and ProGrad's, which
    write the same ones (and for keys of none of them)."""
    keys = set(state_dict)
    if PL + "proj.weight" in keys or any(MAPLE_TEXT.match(k) for k in keys):
        return "maple"
    if PL + "ctx" in keys:
        return "promptsrc" if any(k.startswith(PL + "ZS_image_encoder.") for k in keys) else "ivlp"
    if "meta_net.linear2.weight" in keys:
        return "cocoop"
    if "bias_vectors" in keys:
        return "kgcoop"
    return None


# Which tensors each method's original saves: a file fits the methods of its family.
FAMILY = {
    "coop": "context",
    "prograd": "context",
    "kgcoop": "context",  # KgCoOp's other tensors never train: its context is all it learns
    "cocoop": "cocoop",
    "maple": "maple",
    "ivlp": "vl",
    "promptsrc": "vl",
}


def released_method(checkpoint: dict[str, Any], method: str | None) -> str:
    """The method of a checkpoint: `method` (the command's `method=`), which must fit its tensors,
    or the one its keys (or this project's own record) name."""
    file, state_dict = checkpoint["file"], checkpoint["state_dict"]
    inferred = infer_method(state_dict)
    if inferred is None and "ctx" not in state_dict:
        raise ValueError(f"ckpt={file}: its state dict holds no prompt context ('ctx'); {FIX}")
    family = FAMILY[inferred] if inferred else "context"
    if method is not None:
        if method not in RELEASED:
            raise ValueError(
                f"method={method}: the original code of this method publishes no Dassl checkpoint; "
                f"give one of method={'|'.join(RELEASED)}"
            )
        if FAMILY[method] != family:
            fits = "|".join(m for m, f in FAMILY.items() if f == family)
            raise ValueError(
                f"ckpt={file}: its tensors are not {method}'s: give method={fits} (or leave it out)"
            )
        return method
    recorded = checkpoint.get(METHOD_KEY)
    if isinstance(recorded, str) and FAMILY.get(recorded) == family:
        return recorded
    if inferred is None:
        raise ValueError(
            f"ckpt={file}: its tensors are those of CoOp and ProGrad alike (a context 'ctx'): say which "
            "wrote it with method=coop or method=prograd"
        )
    return inferred


# -- token embeddings back to tokens ------------------------------------------------------------
def token_ids(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The ids of the token-embedding rows `rows` [..., d] in `table` [V, d] (the backbone's token
    embedding, compared at the rows' precision, in which the original saved them), -1 where a row
    is none of the table's. Rows are matched by a random projection, then compared whole."""
    shape = rows.shape[:-1]
    table = table.detach().cpu().to(rows.dtype).float()
    rows = rows.reshape(-1, rows.shape[-1]).float()
    direction = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = table.double() @ direction
    order = keys.argsort()
    position = torch.searchsorted(keys[order], rows.double() @ direction).clamp(1, len(keys) - 1)
    tolerance = 1e-6 * float(table.abs().amax().clamp(min=1))
    ids = torch.full((len(rows),), -1, dtype=torch.long)
    for candidates in (order[position - 1], order[position]):
        same = (table[candidates] - rows).abs().amax(dim=1) <= tolerance
        ids = torch.where((ids < 0) & same, candidates, ids)
    return ids.view(shape)


def _saved_tokens(
    prefix: torch.Tensor, suffix: torch.Tensor, clip: FrozenCLIP, file: str, model: str
) -> list[list[int]]:
    """Each class's token ids after the context, up to EOS (excluded), from the saved embeddings;
    refused when they are not the backbone's (another model=)."""
    table = clip.token_embedding.weight
    sot, eot = (int(t) for t in clip.tokenize([""])[0, :2])
    ids = token_ids(torch.cat([prefix, suffix.to(prefix.dtype)], dim=1), table)  # one look-up
    start, ids = ids[:, 0], ids[:, 1:]
    eos = (ids == eot).int().argmax(dim=1)
    if bool((start != sot).any()) or bool((ids.gather(1, eos[:, None]) != eot).any()):
        raise ValueError(
            f"ckpt={file}: its saved prompt tokens are not token embeddings of {model}: the prompt was "
            "learned on another backbone; give that one with model=... (e.g. model=vit_b16)"
        )
    return [row[: int(end)].tolist() for row, end in zip(ids, eos, strict=True)]


def _name_split(tokens: list[list[int]], clip: FrozenCLIP, classnames: list[str] | None) -> tuple[int, bool]:
    """How many leading tokens after the context are fixed words of every prompt (not the class
    name), and whether the prompts end with the tested `classnames` (then the trained ones): found
    from those names where they are, else as the tokens all classes share."""
    period = int(clip.tokenize(["."])[0, 1])
    names = [t[:-1] if t and t[-1] == period else t for t in tokens]
    if classnames is not None and len(classnames) == len(names):
        wanted = [_ids(clip, name.replace("_", " ")) for name in classnames]
        splits = {
            len(n) - len(w) if len(w) <= len(n) and n[len(n) - len(w) :] == w else -1
            for n, w in zip(names, wanted, strict=True)
        }
        if len(splits) == 1 and -1 not in splits:
            return splits.pop(), True
    shared = 0
    if len(names) > 1:
        shortest = min(len(n) for n in names)
        while shared < shortest - 1 and len({n[shared] for n in names}) == 1:
            shared += 1
    return shared, False


def _ids(clip: FrozenCLIP, text: str) -> list[int]:
    tokens = clip.tokenize([text])[0]
    return tokens[1 : int(tokens.argmax())].tolist()


def _decode(clip: FrozenCLIP, ids: list[int]) -> str:
    return clip.tokenizer.decode(ids).strip()


def _ctx_init(cls: type[Method], clip: FrozenCLIP, n_ctx: int, fixed: list[int], file: str) -> str | None:
    """The `ctx_init` that rebuilds a context of `n_ctx` learned vectors followed by the fixed words
    `fixed`: none without them; with them (the methods that learn only the first tokens of their
    phrase), the method's own phrase where its tokens after the first n_ctx are those, else the
    learned positions as "X" followed by the words."""
    if not fixed:
        return None
    if not issubclass(cls, DeepPrompts):
        raise ValueError(
            f"ckpt={file}: its prompts keep the words {_decode(clip, fixed)!r} after the {n_ctx} learned "
            f"context vectors (a CTX_INIT phrase with more tokens than words), which {cls.name} here "
            "does not rebuild"
        )
    phrase = inspect.signature(cls.__init__).parameters["ctx_init"].default
    if phrase and _ids(clip, phrase)[n_ctx:] == fixed:
        return phrase
    return " ".join(["X"] * n_ctx + [_decode(clip, fixed)])


def _check_prograd_words(template: str, clip: FrozenCLIP, n_ctx: int, fixed: list[int], file: str) -> None:
    """ProGrad's context is its template's words before the name, one vector per word from the
    phrase's leading tokens, the phrase's other tokens kept as text: a ValueError unless `template`
    keeps the file's `fixed` words so."""
    words = template_words(template)
    n_words = word_count(words)
    if n_words > n_ctx or _ids(clip, words)[n_words:] != fixed:
        raise ValueError(
            f"ckpt={file}: its prompts keep the words {_decode(clip, fixed)!r} after the {n_ctx} learned "
            f"vectors, which ProGrad's template {template!r} does not: give the dataset it was trained on "
            "(dataset=..., whose ProGrad template made them)"
        )


def _default_fixed(cls: type[Method], clip: FrozenCLIP, n_ctx: int) -> list[int]:
    """The fixed words the original code keeps with its default phrase, for a file without its
    token_suffix: MaPLe's and IVLP's phrase beyond the first n_ctx tokens (none for CoOp's)."""
    if not issubclass(cls, DeepPrompts):
        return []
    phrase = inspect.signature(cls.__init__).parameters["ctx_init"].default
    return _ids(clip, phrase)[n_ctx:] if phrase else []


# -- a checkpoint as a prompt file's state -------------------------------------------------------
def prompt_from_dassl(
    checkpoint: dict[str, Any],
    clip: FrozenCLIP,
    classnames: list[str] | None,
    method: str | None = None,
    template: str | None = None,
) -> dict[str, Any]:
    """A Dassl checkpoint (`read_dassl`) of the original code as the state of a prompt file of this
    project (src/common/prompt_file.py): what `Method.from_prompt` rebuilds, on `clip` (the backbone
    it was learned on: `model=`). `classnames`: the tested dataset's (None: those it was trained on,
    read from its saved tokens); `method`: the command's `method=` (None: from its keys);
    `template`: the dataset's hand-made one (KgCoOp's and ProGrad's regulariser)."""
    file, sd = checkpoint["file"], checkpoint["state_dict"]
    name = released_method(checkpoint, method)
    cls = import_method(RELEASED[name][0], f"method={name}")
    prefix = PL if issubclass(cls, DeepPrompts) else ""
    ctx = sd[prefix + "ctx"].float()
    width = clip.token_embedding.weight.shape[1]
    if ctx.shape[-1] != width:
        raise ValueError(
            f"ckpt={file}: its context vectors have width {ctx.shape[-1]}, {clip.name}'s token embedding "
            f"{width}: the prompt was learned on another backbone; give that one with model=..."
        )
    n_ctx, class_specific = ctx.shape[-2], ctx.ndim == 3
    trained = None
    if prefix + "token_suffix" in sd and prefix + "token_prefix" in sd:
        tokens = _saved_tokens(
            sd[prefix + "token_prefix"], sd[prefix + "token_suffix"], clip, file, clip.name
        )
        split, same_classes = _name_split(tokens, clip, classnames)
        fixed = tokens[0][:split]
        period = int(clip.tokenize(["."])[0, 1])
        trained = [_decode(clip, t[split : -1 if t and t[-1] == period else None]) for t in tokens]
        if same_classes:
            trained = list(classnames)  # the tested classes are the trained ones, in their own spelling
    else:
        fixed = _default_fixed(cls, clip, n_ctx)
    if classnames is None and trained is None:
        raise ValueError(f"ckpt={file}: it does not keep its class names (token_suffix): give dataset=...")
    hparams: dict[str, Any] = {}
    weights: dict[str, torch.Tensor] = {}
    if issubclass(cls, CoCoOp):
        weights = {k: v.float() for k, v in sd.items() if k.startswith("meta_net.")}
    elif name in ("kgcoop", "prograd"):
        hparams["template"] = template or "a photo of a {}."
        if name == "prograd":
            # the context is the file's; the template's words rebuild the words its prompts keep
            # after it (Oxford Pets': "a type of pet, a photo of a" learns 8 and keeps "a")
            hparams["init_from_template"] = bool(fixed)
            if fixed:
                _check_prograd_words(hparams["template"], clip, n_ctx, fixed, file)
    elif issubclass(cls, MaPLe):
        deep = _indexed(sd, MAPLE_TEXT)
        hparams["prompt_depth"] = len(deep) + 1
        weights["deep_text"] = _stack(deep, (0, n_ctx, width))
        weights["couplings.0.weight"] = sd[PL + "proj.weight"].float()
        weights["couplings.0.bias"] = sd[PL + "proj.bias"].float()
        for key, tensor in sd.items():
            if match := MAPLE_PROJ.match(key):
                weights[f"couplings.{int(match[1]) + 1}.{match[2]}"] = tensor.float()
    elif issubclass(cls, IVLP):
        deep = _indexed(sd, TEXT_DEEP, start=1)
        image = ([sd[IMAGE_INPUT]] if IMAGE_INPUT in sd else []) + _indexed(sd, IMAGE_DEEP, start=1)
        image_width = clip.model.visual.transformer.width
        hparams |= {"prompt_depth_text": len(deep) + 1, "prompt_depth_vision": len(image)}
        if image:
            hparams["n_ctx_vision"] = image[0].shape[0]
        weights["deep_text"] = _stack(deep, (0, n_ctx, width))
        weights["visual_prompts"] = _stack(image, (0, hparams.get("n_ctx_vision", 4), image_width))
    state = {
        "format": PROMPT_FORMAT,
        "method": name,
        "class": class_path(cls),
        "backbone": clip.name,
        "pretrained": clip.pretrained,
        "backbone_seed": clip.seed,
        "classnames": list(trained if trained is not None else classnames),
        "ctx": ctx,
        "n_ctx": n_ctx,
        "class_specific": class_specific,
        "class_token_position": "end",
        "ctx_init": None if hparams.get("init_from_template") else _ctx_init(cls, clip, n_ctx, fixed, file),
        "ctx_init_count": "words",
        "hparams": hparams,
        "weights": weights,
        "trained_on": None,
        "released": {"file": file, "epoch": checkpoint.get("epoch")},
    }
    log.info(
        "%s: %s's prompt (Dassl checkpoint, epoch %s) on %s", file, name, checkpoint.get("epoch"), clip.name
    )
    return state


def _indexed(sd: dict[str, torch.Tensor], pattern: re.Pattern, start: int = 0) -> list[torch.Tensor]:
    """The tensors whose keys match `pattern` (an index, then maybe more), by index from `start`;
    the indices must follow each other."""
    found = {int(m[1]): v for k, v in sd.items() if (m := pattern.match(k))}
    expected = list(range(start, start + len(found)))
    if sorted(found) != expected:
        raise ValueError(
            f"the prompts of blocks {sorted(found)} are not those of consecutive blocks {expected}"
        )
    return [found[i].float() for i in expected]


def _stack(tensors: list[torch.Tensor], empty: tuple[int, ...]) -> torch.Tensor:
    return torch.stack(tensors) if tensors else torch.empty(empty)


# -- a method as the original code's checkpoint ----------------------------------------------------
def dassl_state(module: Method) -> tuple[str, dict[str, torch.Tensor]]:
    """What the original code of `module`'s method saves of it: its Dassl model name and state dict
    (the prompt's tensors under the original names, with token_prefix and token_suffix as the
    originals save them; a whole-CLIP model's frozen weights are left out, as its `load_model`
    loads with strict=False)."""
    name = module.name if module.name in RELEASED else None
    for method, (path, _) in RELEASED.items():
        if name is None and class_path(type(module)) == path:
            name = method
    if name is None or not isinstance(module, CoOp):
        choices = ", ".join(RELEASED)
        raise ValueError(
            f"method {module.name!r}: no original code of it publishes Dassl checkpoints; export takes "
            f"the prompts of {choices}"
        )
    learner = module.prompt_learner
    if learner.class_token_position != "end":
        log.warning(
            "the class name is at the %s of the prompts: give the original code "
            "TRAINER.COOP.CLASS_TOKEN_POSITION %s (its checkpoints do not record it)",
            learner.class_token_position,
            learner.class_token_position,
        )
    prefix = PL if isinstance(module, DeepPrompts) else ""
    sd = {
        prefix + "ctx": learner.ctx,
        prefix + "token_prefix": learner.token_prefix,
        prefix + "token_suffix": learner.token_suffix,
    }
    if isinstance(module, CoCoOp):
        sd |= {f"meta_net.{k}": v for k, v in module.meta_net.state_dict().items()}
    elif isinstance(module, MaPLe):
        sd[PL + "proj.weight"] = module.couplings[0].weight
        sd[PL + "proj.bias"] = module.couplings[0].bias
        for i, prompts in enumerate(module.deep_text):
            sd[f"{PL}compound_prompts_text.{i}"] = prompts
            sd[f"{PL}compound_prompt_projections.{i}.weight"] = module.couplings[i + 1].weight
            sd[f"{PL}compound_prompt_projections.{i}.bias"] = module.couplings[i + 1].bias
    elif isinstance(module, IVLP):
        for i, prompts in enumerate(module.deep_text, start=1):
            sd[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = prompts
        for i, prompts in enumerate(module.visual_prompts):
            sd[IMAGE_INPUT if i == 0 else f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = prompts
    return RELEASED[name][1], {k: v.detach().float().cpu().clone() for k, v in sd.items()}
