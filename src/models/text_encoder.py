"""CLIP's text tower run on prompt embeddings (not token ids), exactly and cheaply.

The reference CoOp runs every class prompt through all 77 positions at every step. With a causal
mask the feature at the EOS token depends on nothing after it, and positions before the class name
are the same for every class when the context is shared. Three paths compute the same features
(`path`, config `model.text_path`):

- "reference": open_clip's computation over all 77 positions, as the original code does;
- "grouped" (fastest on CPU, where the cost is arithmetic): classes are grouped by prompt length
  and each group runs only up to its own EOS; the shared prefix (SOS + the context before the class
  name) runs once and each class's remaining tokens attend to its cached keys and values through
  one matmul over all classes (no copy of the prefix per class);
- "batched" (fastest on a GPU, where the cost is kernel launches and small matrices): one pass over
  all classes cut at the longest EOS (positions after a prompt's own EOS cannot change its
  feature), attention through `scaled_dot_product_attention` (flash / memory-efficient kernels);
  where that saves enough positions (many classes sharing a context), the shared prefix runs once
  and its keys and values are placed before every class's own, with a lower-right causal mask,
  which those kernels take without a materialised mask;
- "auto" (default): "grouped" on CPU, "batched" on any other device, chosen at the first forward
  from the device the prompts are on, and logged.

Optionally, classes are processed in chunks whose activations are recomputed in backward
(torch.utils.checkpoint), which bounds memory for 1000-class class-specific contexts.

Several runs' prompts are encoded in one call when they are laid out alike (the same EOS positions
and shared prefix length; src/packing/module.py): prompts [runs, n, L, width], each run's prefix its own.
Every path then runs the runs' prefixes as one batch and their classes together, each class
attending to its own run's prefix; one run is a stack of one, computed as before.

Text towers that break these shortcuts (no causal mask, pooling another position, a class token)
fall back to the reference computation over the full context length.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, text_global_pool
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from src.common.messages import one_of

log = logging.getLogger(__name__)

TextPath = Literal["auto", "grouped", "batched", "reference"]
TEXT_PATHS = ("auto", "grouped", "batched", "reference")


def check_text_path(path: str) -> None:
    if path not in TEXT_PATHS:
        raise ValueError(one_of("model.text_path", path, TEXT_PATHS))


class TextEncoder(nn.Module):
    """Encodes prompt embeddings [n_cls, length, width] into text features [n_cls, embed_dim]."""

    def __init__(
        self,
        clip_model: nn.Module,
        path: TextPath = "auto",
        chunk: int | None = None,
        prefix_min_tokens: int = 4096,
    ) -> None:
        super().__init__()
        check_text_path(path)
        tower = getattr(clip_model, "text", clip_model)
        if not hasattr(tower, "token_embedding"):
            raise ValueError(
                f"model: {type(tower).__name__} has no token-embedding table, so prompts cannot be "
                "learned in its input space; pick an open_clip model with a CLIP text transformer"
            )
        # A view over the backbone's own modules, kept out of this module's registry so that the
        # frozen weights are owned (and moved, and excluded from checkpoints) in one place.
        self.__dict__["tower"] = tower
        self.pool_type = getattr(tower, "text_pool_type", None) or tower.pool_type
        causal = getattr(tower, "attn_mask", None) is not None
        self.eos_cut_exact = (
            causal and self.pool_type in ("argmax", "eos") and getattr(tower, "cls_emb", None) is None
        )
        if path != "reference" and not self.eos_cut_exact:
            log.warning(
                "text tower has no causal mask or pools another position than EOS: "
                "using the reference full-length text computation"
            )
            path = "reference"
        self.path = path
        self.prefix_sharing = path != "reference" and all(
            type(blk) is ResidualAttentionBlock
            and not hasattr(blk, "ln_1_kv")
            and isinstance(blk.attn, nn.MultiheadAttention)
            and blk.attn.in_proj_weight is not None
            for blk in tower.transformer.resblocks
        )
        self.chunk = chunk if path != "reference" and chunk else None
        # The batched path runs the shared prefix apart only when that saves at least this many
        # token positions: on a GPU a small pass costs its kernel launches, not its arithmetic.
        self.prefix_min_tokens = prefix_min_tokens
        self._logged_path: str | None = None

    def resolved_path(self, device: torch.device | str) -> str:
        """The path that runs for prompts on `device` ("auto" resolved)."""
        if self.path != "auto":
            return self.path
        return "grouped" if torch.device(device).type == "cpu" else "batched"

    @property
    def fast(self) -> bool:
        """Whether prompts are cut at their EOS (every path but the reference)."""
        return self.path != "reference"

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.tower.token_embedding

    @property
    def context_length(self) -> int:
        return self.tower.positional_embedding.shape[0]

    def prompt_length(self, eos: torch.Tensor | int) -> int:
        """How many leading positions of the prompts this encoder needs, given their EOS positions
        or the largest of them (an int, known on the host: no device sync)."""
        if not self.fast:
            return self.context_length
        return (int(eos.max()) if isinstance(eos, torch.Tensor) else eos) + 1

    def forward(self, prompts: torch.Tensor, eos: torch.Tensor, shared_len: int = 1) -> torch.Tensor:
        """prompts: [n, L, width] embeddings, or [runs, n, L, width] for several runs' prompts laid
        out alike; eos: [n] EOS positions; shared_len: how many leading positions are identical for
        every prompt of a run (their hidden states then are too). Features [n, d] ([runs, n, d])."""
        stacked = prompts.ndim == 4
        prompts = prompts if stacked else prompts[None]
        path = self.resolved_path(prompts.device)
        if path != self._logged_path:
            log.info("text encoder: %s path on %s (model.text_path=%s)", path, prompts.device.type, self.path)
            self._logged_path = path
        runs, n = prompts.shape[:2]
        if path == "reference":
            feats = self._plain(prompts.flatten(0, 1), eos.repeat(runs)).view(runs, n, -1)
            return feats if stacked else feats[0]
        pos = self.tower.positional_embedding.to(self._dtype)
        prefix_kv = None
        saved = runs * n * (shared_len - 1)  # SOS alone is shared by any prompts
        if self.prefix_sharing and (path == "grouped" or saved >= self.prefix_min_tokens):
            prefix = prompts[:, 0, :shared_len].to(self._dtype) + pos[:shared_len]
            prefix_kv = self._prefix_keys_values(prefix)
        else:
            shared_len = 0
        if path == "batched":
            feats = self._batched(prompts, eos, shared_len, pos, prefix_kv)
            return feats if stacked else feats[0]
        order, parts = [], []
        for length in torch.unique(eos).tolist():
            group = torch.nonzero(eos == length).flatten()
            for idx in group.split(self.chunk or len(group)):
                x = prompts[:, idx, shared_len : length + 1].to(self._dtype) + pos[shared_len : length + 1]
                if self.chunk:
                    parts.append(checkpoint(self._suffix, x, prefix_kv, use_reentrant=False))
                else:
                    parts.append(self._suffix(x, prefix_kv))
                order.append(idx)
        feats = torch.cat(parts, dim=1)[:, torch.argsort(torch.cat(order))]
        return feats if stacked else feats[0]

    def _batched(
        self,
        prompts: torch.Tensor,
        eos: torch.Tensor,
        shared_len: int,
        pos: torch.Tensor,
        prefix_kv: list | None,
    ) -> torch.Tensor:
        """All classes of all runs in one pass (or in chunks of `chunk` prompts) over the positions
        given, which `prompt_length` cuts at the longest EOS (reading that here would sync with the
        device)."""
        runs, n, length = prompts.shape[:3]
        x = (prompts[:, :, shared_len:].to(self._dtype) + pos[shared_len:length]).flatten(0, 1)
        last = (eos - shared_len).repeat(runs)  # where each prompt's EOS sits among the positions run here
        run_of = torch.arange(runs, device=x.device).repeat_interleave(n)
        step = self.chunk or len(x)
        feats = []
        for start in range(0, len(x), step):
            part = slice(start, start + step)
            # the runs' prefixes go in as they are (a checkpointed chunk keeps its inputs until backward)
            args = (x[part], last[part], prefix_kv, run_of[part])
            if self.chunk:
                feats.append(checkpoint(self._suffix_batched, *args, use_reentrant=False))
            else:
                feats.append(self._suffix_batched(*args))
        return torch.cat(feats).view(runs, n, -1)

    def _suffix_batched(
        self, x: torch.Tensor, last: torch.Tensor, prefix_kv: list | None, run_of: torch.Tensor
    ) -> torch.Tensor:
        """Prompts x [n, length, width] after their runs' prefixes (`run_of`: each prompt's run)."""
        blocks = self.tower.transformer.resblocks
        if not self.prefix_sharing:  # blocks of another kind: open_clip's own computation
            x = self.tower.transformer(x, attn_mask=self.tower.attn_mask[: x.shape[1], : x.shape[1]])
        else:
            for blk, kv in zip(blocks, prefix_kv or [None] * len(blocks), strict=True):
                if kv is not None:  # each prompt attends to its own run's prefix (one run: a view)
                    kv = tuple(t.expand(len(x), -1, -1, -1) if len(t) == 1 else t[run_of] for t in kv)
                x, _ = _block(blk, x, kv, batched=True)
        x = x[torch.arange(len(x), device=x.device), last]
        return self._project(self.tower.ln_final(x))

    @property
    def _dtype(self) -> torch.dtype:
        return self.tower.transformer.get_cast_dtype()

    def _plain(self, prompts: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """Exactly open_clip's encode_text, from embeddings (the reference computation)."""
        length = prompts.shape[1]
        x = prompts.to(self._dtype) + self.tower.positional_embedding[:length].to(self._dtype)
        mask = self.tower.attn_mask
        x = self.tower.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
        return self.pool(x, eos)

    def pool(self, x: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """The text features of the last block's hidden states [n, L, width], as encode_text
        pools and projects them."""
        x = self.tower.ln_final(x)
        if self.pool_type in ("argmax", "eos"):
            x = x[torch.arange(x.shape[0], device=x.device), eos]
        else:
            x = text_global_pool(x, pool_type=self.pool_type)
        return self._project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.tower.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def _suffix(self, x: torch.Tensor, prefix_kv: list | None) -> torch.Tensor:
        """Runs prompts [runs, n, length, width] ending at their EOS (after their run's shared
        prefix, if any); returns features [runs, n, d]."""
        runs, n = x.shape[:2]
        x = x.flatten(0, 1)
        if prefix_kv is None:
            length = x.shape[1]
            x = self.tower.transformer(x, attn_mask=self.tower.attn_mask[:length, :length])
        else:
            for blk, kv in zip(self.tower.transformer.resblocks, prefix_kv, strict=True):
                x, _ = _block(blk, x, kv)
        return self._project(self.tower.ln_final(x[:, -1])).view(runs, n, -1)

    def _prefix_keys_values(self, x: torch.Tensor) -> list:
        """Each block's keys and values [runs, heads, shared, head_dim] of the prefixes `x`."""
        kvs = []
        for blk in self.tower.transformer.resblocks:
            x, (k, v) = _block(blk, x, None)
            if len(x) > 1:
                # Views into the block's qkv would be copied by every matmul that folds runs and
                # heads into one batch (and kept for backward): once here instead, for all of them.
                k, v = k.contiguous(), v.contiguous()
            kvs.append((k, v))
        return kvs


def _block(
    blk: ResidualAttentionBlock, x: torch.Tensor, prefix_kv: tuple | None, batched: bool = False
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """open_clip's ResidualAttentionBlock with a causal mask, where the queries of `x` may also
    attend to the cached keys/values of their run's shared prefix placed before them (through one
    fused attention call with `batched`, where the prefix is given per prompt, else through
    `_attend_with_prefix`'s shared matmul, where it is given per run)."""
    n, length, width = x.shape
    heads = blk.attn.num_heads
    qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
    q, k, v = (t.view(n, length, heads, width // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    if prefix_kv is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif batched:
        out = _attend_after_prefix_fused(q, k, v, *prefix_kv)
    else:
        out = _attend_with_prefix(q, k, v, *prefix_kv)
    out = blk.attn.out_proj(out.transpose(1, 2).reshape(n, length, width))
    x = x + blk.ls_1(out)
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, (k, v)


def _attend_with_prefix(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor
) -> torch.Tensor:
    """Causal attention of q/k/v [n, heads, length, head_dim] placed after a prefix whose keys and
    values pk/pv [runs, heads, shared, head_dim] are the same for all n / runs prompts of a run
    (the prompts run after run).

    The prefix part is one matmul per run over the queries of all its prompts (heads x (n / runs *
    length) rows) instead of a copy of the prefix's keys and values per prompt."""
    n, heads, length, dim = q.shape
    runs, shared = pk.shape[0], pk.shape[2]
    per_run = n // runs

    def by_run(t: torch.Tensor) -> torch.Tensor:  # [n, heads, length, c] -> [runs, heads, rows, c]
        rows = per_run * length
        return t.view(runs, per_run, heads, length, -1).transpose(1, 2).reshape(runs, heads, rows, -1)

    def by_prompt(t: torch.Tensor) -> torch.Tensor:  # the inverse
        return t.view(runs, heads, per_run, length, -1).transpose(1, 2).reshape(n, heads, length, -1)

    q = q * dim**-0.5
    prefix_scores = by_prompt(by_run(q) @ pk.transpose(2, 3))
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    own_scores = (q @ k.transpose(2, 3)).masked_fill(~causal, float("-inf"))
    probs = torch.cat([prefix_scores, own_scores], dim=-1).softmax(dim=-1)
    prefix_out = by_prompt(by_run(probs[..., :shared]) @ pv)
    return prefix_out + probs[..., shared:] @ v


def _attend_after_prefix_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor
) -> torch.Tensor:
    """The same attention as `_attend_with_prefix`, as one scaled_dot_product_attention call: each
    prompt's prefix keys and values pk/pv [n, heads, shared, head_dim] are placed before its own,
    and query i (position shared + i) sees keys 0 .. shared + i, a causal mask aligned to the lower
    right, which the flash and memory-efficient kernels apply without a materialised mask. The
    concatenation copies the prefix once per prompt (a few MB at 1000 classes), one kernel."""
    keys = torch.cat([pk, k], dim=2)
    values = torch.cat([pv, v], dim=2)
    mask = causal_lower_right(q.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
