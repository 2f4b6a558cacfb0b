"""CLIP-LoRA (Zanella and Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPR
Workshops 2024): low-rank adapters on the query, key and value projections of the attention blocks
of both encoders, trained with cross-entropy on the class names in one template; nothing else of
CLIP changes.

The adapters are PEFT's LoRA Linear layers (`peft.inject_adapter_in_model`), put on separate q, k
and v Linears that are split here from each `nn.MultiheadAttention` (PEFT does not split it; see
`SplitAttention`), in a copy of the model that shares every frozen tensor with the backbone, which
stays as it was for its other users.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from src.common.messages import override
from src.methods.base import Method, TextOncePerEvaluation, plain
from src.methods.zeroshot import HandMadeGuided
from src.models.clip import Architecture, FrozenCLIP
from src.models.text_encoder import TextEncoder

Encoder = Literal["both", "text", "vision"]
# The official code's names of the adaptable projections (its `--params`).
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


class SplitAttention(nn.Module):
    """An `nn.MultiheadAttention` with its packed input projection split into three Linears, q_proj,
    k_proj and v_proj, whose weights and biases are the rows of `in_proj_weight` / `in_proj_bias` in
    PyTorch's packing order; out_proj is the attention's own module. The same function (open_clip
    calls it as `attn(x, x, x, need_weights=False, attn_mask=mask)`), so that a low-rank adapter can
    be put on each projection, as CLIP-LoRA's `PlainMultiheadAttentionLoRA` does.

    Hand-written: PEFT's `nn.MultiheadAttention` support adapts the packed in_proj with one adapter
    (one A shared by q, k and v) plus an adapter on out_proj that cannot be left out, and drops the
    LoRA dropout; that is another method than CLIP-LoRA's three independent adapters.
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        if not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError(
                "method=clip_lora splits attention with one packed q/k/v projection and no extra key "
                "or value bias (CLIP's nn.MultiheadAttention); this backbone's attention has another form"
            )
        width = attention.embed_dim
        self.num_heads = attention.num_heads
        self.batch_first = attention.batch_first
        # CLIP's attention has no dropout (the official code's copy hard-codes 0 too)
        self.dropout = attention.dropout
        has_bias = attention.in_proj_bias is not None
        weights = attention.in_proj_weight.detach().chunk(3)
        biases = attention.in_proj_bias.detach().chunk(3) if has_bias else (None,) * 3
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases, strict=True):
            linear = nn.Linear(width, width, bias=has_bias, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if has_bias:
                    linear.bias.copy_(bias)
            setattr(self, name, linear.requires_grad_(False))
        self.out_proj = attention.out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """(attention output, None); a float `attn_mask` is added to the scores, a boolean one marks
        the positions not attended (as nn.MultiheadAttention's); [L, S] or [n * heads, L, S]."""
        if need_weights:
            raise ValueError("method=clip_lora's attention computes no attention weights (need_weights=True)")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, width = query.shape

        def heads(projection: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return projection(x).view(n, -1, self.num_heads, width // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj, query), heads(self.k_proj, key), heads(self.v_proj, value)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                    attn_mask, float("-inf")
                )
            if attn_mask.ndim == 3:
                attn_mask = attn_mask.view(n, self.num_heads, *attn_mask.shape[1:])
            attn_mask = attn_mask.to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules holding the very same parameter and buffer tensors (no memory
    copied): modules of the copy can be replaced without changing `model`."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return copy.deepcopy(model, {id(t): t for t in tensors})


def transformers_to_adapt(model: nn.Module, encoder: Encoder, model_name: str) -> dict[str, nn.Module]:
    """The open_clip transformers (text, then vision) whose blocks get adapters, by module path."""
    found = {}
    if encoder in ("both", "text"):
        tower = getattr(model, "text", model)  # open_clip's CustomTextCLIP has a text tower
        transformer = getattr(tower, "transformer", None)
        if not hasattr(transformer, "resblocks"):
            raise ValueError(
                f"model.name={model_name}: its text encoder has no open_clip transformer blocks to "
                "adapt; use an open_clip CLIP (e.g. model=vit_b16) or method.module.encoder=vision"
            )
        found["transformer" if tower is model else "text.transformer"] = transformer
    if encoder in ("both", "vision"):
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"model.name={model_name}: its image encoder ({type(visual).__name__}) has no "
                "attention blocks to adapt; CLIP-LoRA needs a ViT (e.g. model=vit_b16) or "
                "method.module.encoder=text"
            )
        found["visual.transformer"] = visual.transformer
    for path, transformer in found.items():
        attentions = [block.attn for block in transformer.resblocks]
        unfit = [type(a).__name__ for a in attentions if not isinstance(a, nn.MultiheadAttention)]
        if unfit:
            raise ValueError(
                f"model.name={model_name}: the attention of {path} is {unfit[0]}, not "
                "nn.MultiheadAttention; method=clip_lora adapts open_clip's standard blocks only"
            )
    return found


class CLIPLoRA(TextOncePerEvaluation, Method):
    """LoRA on the q, k, v projections of every attention block (or of `layers`) of both encoders
    (or of `encoder`): rank `rank`, scaling alpha / sqrt(rank) (the official code's, rsLoRA's),
    dropout on the adapters' input, A kaiming-uniform and B zero, so an untrained model is CLIP.
    Logits: a fixed `logit_scale` (100, the official; None: CLIP's) times the cosine of the adapted
    image features and the adapted text features of `template` for each class, recomputed with
    gradients at every step. The recipe (conf/method/clip_lora.yaml): AdamW on the adapters only,
    cosine per step to 1e-6, no warm-up, over the trainer's steps (`trainer.max_steps`, 500 x
    shots)."""

    name = "clip_lora"
    needs_images = True  # the adapted image encoder: images, never cached features

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: list[str],
        rank: int = 2,
        alpha: float = 1.0,
        dropout: float = 0.25,
        encoder: Encoder = "both",
        params: Sequence[str] = ("q", "k", "v"),
        layers: Sequence[int] | None = None,
        template: str = "a photo of a {}.",
        logit_scale: float | None = 100.0,
    ) -> None:
        super().__init__(clip, classnames)
        params, layers = list(params), None if layers is None else list(layers)
        self.save_hyperparameters(ignore=["clip", "classnames"])
        self.model = shared_copy(clip.model)
        transformers = transformers_to_adapt(self.model, encoder, clip.name)
        targets = []
        for path, transformer in transformers.items():
            blocks = transformer.resblocks
            for i in range(len(blocks)) if layers is None else sorted(set(layers)):
                blocks[i].attn = SplitAttention(blocks[i].attn)
                targets += [f"{path}.resblocks.{i}.attn.{PROJECTIONS[p]}" for p in params]
        lora = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            use_rslora=True,  # scaling alpha / sqrt(r), as the official code (not LoRA's alpha / r)
            # a regular expression matches whole names; a list would also match by suffix
            # (transformer.resblocks.0.attn.out_proj in visual.transformer.resblocks.0.attn.out_proj)
            target_modules="|".join(re.escape(target) for target in targets),
            bias="none",
        )
        inject_adapter_in_model(lora, self.model)
        self.adapters = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        self.train(False)

        self.template = template
        self.logit_scale = logit_scale
        prompts = [template.format(name.replace("_", " ")) for name in self.classnames]
        tokens = clip.tokenize(prompts).to(clip.token_embedding.weight.device)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eos", tokens.argmax(dim=-1), persistent=False)
        self.max_eos = int(tokens.argmax(dim=-1).max())  # on the host: no device sync per step
        # the project's exact text encoder (cut at the EOS), run on the adapted text tower
        self.text = TextEncoder(self.model, path=clip.text.path, chunk=clip.text.chunk)
        self.iterations: int | None = None  # of a rebuilt method: those it was trained for

    @classmethod
    def check_config(cls, args: dict[str, Any], architecture: Architecture) -> None:
        super().check_config(args, architecture)
        check_options(args["rank"], args["dropout"], args["encoder"], list(args["params"]))
        HandMadeGuided.check_template(args["template"])
        encoder, layers = args["encoder"], args["layers"]
        if encoder in ("both", "vision") and architecture.image_encoder != "vit":
            raise ValueError(
                f"model.name={architecture.name}: its image encoder ({architecture.image_encoder}) has no "
                "attention blocks to adapt; CLIP-LoRA needs a ViT (e.g. model=vit_b16) or "
                f"{override('method.module.encoder', 'text')}"
            )
        towers = {"text": architecture.text_blocks, "vision": architecture.image_blocks}
        counts = [n for tower, n in towers.items() if encoder in (tower, "both") and n is not None]
        if layers is not None and counts and not (layers and all(0 <= i < min(counts) for i in layers)):
            raise ValueError(
                f"method.module.layers={list(layers)}: use block indices 0 .. {min(counts) - 1} of "
                f"{architecture.name}'s {min(counts)} blocks, or for every block: use "
                f"{override('method.module.layers', None)}"
            )

    def train(self, mode: bool = True) -> CLIPLoRA:
        # CLIP's modules stay in eval mode, as FrozenCLIP's; only the adapters' dropout follows the
        # mode (the official code sets all of CLIP to train mode, where only that dropout reacts).
        super().train(mode)
        self.model.eval()
        for adapter in self.adapters:
            adapter.train(mode)
        return self

    # -- the method -------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """The adapted text encoder's features of the class prompts [n_cls, d]."""
        length = self.text.prompt_length(self.max_eos)
        return self.text(self.text.token_embedding(self.tokens[:, :length]), self.eos)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(
                "method=clip_lora adapts the image encoder, so it takes images, not cached image "
                "features: use data.cache_features=false data.train_views=0"
            )
        return self.model.encode_image(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images [b, 3, h, w]."""
        text = self._eval_text_features
        if text is None:
            text = self.text_features()
        image = F.normalize(self.image_features(images), dim=-1)
        scale = self.clip.logit_scale if self.logit_scale is None else self.logit_scale
        return scale * image @ F.normalize(text, dim=-1).t()

    # -- Lightning hooks --------------------------------------------------------------------
    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """`ce`: the cross-entropy of the adapted model's logits."""
        return {"ce": F.cross_entropy(self(images), labels)}

    # -- results and the adapters, as a small portable file ---------------------------------
    def trained_iterations(self) -> int | None:
        """The optimiser steps behind the adapters: this process's training, or the prompt file's."""
        trainer = self._trainer
        if trainer is not None and trainer.global_step > 0:
            return trainer.global_step
        return self.iterations

    def result_fields(self) -> dict[str, Any]:
        hp = self.hparams
        fields = {
            **super().result_fields(),
            "iterations": self.trained_iterations(),
            "rank": hp.rank,
            "alpha": hp.alpha,
            "lora_dropout": hp.dropout,
            "encoder": hp.encoder,
            "params": list(hp.params),
            "layers": None if hp.layers is None else list(hp.layers),
            "template": self.template,
            "logit_scale": self.logit_scale,
            "adapter_params": sum(p.numel() for p in self.parameters() if p.requires_grad),
        }
        trainer = self._trainer
        if trainer is not None and trainer.global_step > 0:
            fields["epochs"] = trainer.current_epoch  # trained by steps: the epochs those took
        return fields

    def method_state(self) -> dict[str, Any]:
        """The adapters' A and B by name (kilobytes; none of CLIP's weights) and what rebuilds them."""
        return {
            "hparams": plain(dict(self.hparams)),
            "weights": self.trained_weights(),
            "iterations": self.trained_iterations(),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the adapted copy's frozen tensors are CLIP's (or made from them): only the adapters are kept
        state = checkpoint["state_dict"]
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        for key in [k for k in state if k.startswith("model.") and k not in trained]:
            del state[key]
        super().on_save_checkpoint(checkpoint)

    @classmethod
    def from_prompt(
        cls,
        state: dict[str, Any],
        clip: FrozenCLIP,
        classnames: list[str] | None = None,
        template: str | None = None,
    ) -> CLIPLoRA:
        """The adapted CLIP rebuilt from its prompt file, for its own class list or another (the
        adapters do not depend on the classes)."""
        module = cls.rebuilt(state, clip, classnames, state["hparams"])
        module.iterations = state.get("iterations")
        return module


def check_options(rank: int, dropout: float, encoder: str, params: list[str]) -> None:
    if rank < 1:
        raise ValueError(f"method.module.rank={rank}: the adapters' rank must be at least 1")
    if not 0 <= dropout < 1:
        raise ValueError(f"method.module.dropout={dropout}: use a probability in [0, 1)")
    if encoder not in ("both", "text", "vision"):
        raise ValueError(f"method.module.encoder={encoder}: use both, text or vision")
    if not params or not set(params) <= set(PROJECTIONS):
        raise ValueError(f"method.module.params={params}: use some of q, k, v, o (o: the output projection)")
