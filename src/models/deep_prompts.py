"""open_clip's two encoders run block by block, with learned prompt tokens put in between blocks
(deep prompts, as MaPLe uses them).

open_clip's blocks take no extra tokens, so its encoders are run here piece by piece: its own
embedding, block, pooling and projection modules, in the order of its encode_image / encode_text,
and nothing else (tested equal to them without prompts). Only the token sequence between blocks
is changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from src.models.text_encoder import TextEncoder


def run_blocks(
    transformer: nn.Module,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    before_block: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """open_clip's Transformer.forward on x [n, L, width], with `before_block(i, x)` applied to the
    tokens entering block i."""
    for i, block in enumerate(transformer.resblocks):
        x = before_block(i, x)
        if transformer.batch_first:
            x = block(x, attn_mask=attn_mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


def check_prompt_ready_vit(
    visual: nn.Module, model_name: str, tokens: str = "prompts", user: str = "multi-modal prompts need"
) -> None:
    """Deep prompts (or MMRL's representation `tokens`) are extra tokens: the image encoder must be
    open_clip's ViT; `user` says who needs it."""
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"model.name={model_name}: its image encoder ({type(visual).__name__}) has no token "
            f"sequence to put {tokens} into; {user} a ViT, e.g. model=vit_b16"
        )
    if not (hasattr(visual, "_embeds") and hasattr(visual, "_pool")):
        raise ValueError(f"{user} open_clip_torch >= 3.0 (VisionTransformer._embeds): upgrade it")


def encode_image(
    visual: VisionTransformer, images: torch.Tensor, prompts: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Image features of `images` [b, 3, h, w] with prompts[i] ([n, width], the same n for every
    i) as the last n tokens entering block i: appended after the patch tokens at block 0 (through
    ln_pre, like every input token), replacing the previous block's outputs there afterwards. They
    are dropped before pooling. No prompts: open_clip's encode_image."""
    x = visual._embeds(images)
    n = len(prompts[0]) if prompts else 0

    def insert(i: int, x: torch.Tensor) -> torch.Tensor:
        if i >= len(prompts):
            return x
        tokens = prompts[i].to(x.dtype).expand(len(x), -1, -1)
        if i == 0:
            return torch.cat([x, visual.ln_pre(tokens)], dim=1)
        return torch.cat([x[:, :-n], tokens], dim=1)

    x = run_blocks(visual.transformer, x, None, insert)
    pooled, _ = visual._pool(x[:, : x.shape[1] - n])
    return pooled if visual.proj is None else pooled @ visual.proj


def encode_text(
    text: TextEncoder,
    prompts: torch.Tensor,
    eos: torch.Tensor,
    deep: Sequence[torch.Tensor],
    start: int = 1,
) -> torch.Tensor:
    """Text features of prompt embeddings [n_cls, L, width] whose positions start .. start + m hold
    the context at the input; entering block i >= 1, those positions' hidden states are replaced
    by deep[i - 1] ([m, width], shared by all prompts) while there are deep prompts. No deep
    prompts: open_clip's encode_text (from embeddings)."""
    tower = text.tower
    dtype = tower.transformer.get_cast_dtype()
    length = prompts.shape[1]
    x = prompts.to(dtype) + tower.positional_embedding[:length].to(dtype)
    mask = tower.attn_mask
    mask = None if mask is None else mask[:length, :length]

    def replace(i: int, x: torch.Tensor) -> torch.Tensor:
        if not 1 <= i <= len(deep):
            return x
        tokens = deep[i - 1].to(x.dtype).expand(len(x), -1, -1)
        return torch.cat([x[:, :start], tokens, x[:, start + tokens.shape[1] :]], dim=1)

    return text.pool(run_blocks(tower.transformer, x, mask, replace), eos)
