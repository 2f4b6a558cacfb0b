"""open_clip's two encoders with representation tokens (MMRL, Guo and Gu, CVPR 2025): K learned
tokens inserted into both encoders from block `start` on, right after the class token (image) or
the start-of-text token (text), replaced by new ones before each later block that has its own.

As in deep_prompts.py, open_clip's own modules run piece by piece in the order of its
encode_image / encode_text (tested equal to them without tokens). Unlike MaPLe's prompts, these
tokens enter mid-network: no positional embedding and no ln_pre, and the text sequence grows by K
under a causal mask as long as the new sequence, so every word and the end-of-text token see them,
the start-of-text token does not, and the end-of-text token sits K positions further on.

Each encoder is split at `start` (`*_prefix`, `*_suffix`): the blocks before it see no token, so
their output is shared by the frozen CLIP's features (the image regulariser) and, for the fixed
text of the class prompts, computed once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from src.common.messages import override
from src.models.deep_prompts import check_prompt_ready_vit
from src.models.text_encoder import TextEncoder


def check_rep_layers(rep_layers: Sequence[int], clip_name: str, blocks: int) -> None:
    """Representation tokens enter consecutive blocks, numbered 1 .. `blocks` as the official
    REP_LAYERS ([6, ..., 12] on ViT-B/16's 12 blocks)."""
    layers = list(rep_layers)
    if (
        not layers
        or layers != list(range(layers[0], layers[0] + len(layers)))
        or not (1 <= layers[0] and layers[-1] <= blocks)
    ):
        example = list(range(blocks - blocks * 7 // 12 + 1, blocks + 1))  # the official 7 of 12
        raise ValueError(
            f"method.module.rep_layers={layers}: {clip_name} has {blocks} blocks: use "
            f"{override('method.module.rep_layers', example)} (consecutive block numbers within "
            f"1 .. {blocks}; the official ones are the upper 7 of 12)"
        )


def check_vit(visual: nn.Module, clip_name: str) -> None:
    """Representation tokens are tokens: the image encoder must be open_clip's ViT."""
    check_prompt_ready_vit(visual, clip_name, "representation tokens", "method=mmrl needs")


def run_block(
    transformer: nn.Module, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """One of open_clip's blocks on x [n, L, width], as its Transformer.forward runs it."""
    if transformer.batch_first:
        return block(x, attn_mask=mask)
    return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)


def _put_tokens(x: torch.Tensor, tokens: torch.Tensor, replace: int) -> torch.Tensor:
    """x with `tokens` [K, width] after its first position, in place of the `replace` positions
    there (0: inserted, the sequence grows by K)."""
    tokens = tokens.to(x.dtype).expand(len(x), -1, -1)
    return torch.cat([x[:, :1], tokens, x[:, 1 + replace :]], dim=1)


def image_prefix(visual: VisionTransformer, images: torch.Tensor, start: int) -> torch.Tensor:
    """The hidden states [b, 1 + patches, width] of `images` [b, 3, h, w] entering block `start`."""
    transformer = visual.transformer
    x = visual._embeds(images)
    for block in transformer.resblocks[:start]:
        x = run_block(transformer, block, x, None)
    return x


def image_suffix(
    visual: VisionTransformer, x: torch.Tensor, tokens: Sequence[torch.Tensor], start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks `start` .. of the image encoder from `image_prefix`'s hidden states, tokens[j] ([K,
    width]) entering block start + j after the class token. Returns the image features (open_clip's
    pooling and projection of the sequence without the K tokens: the class token's for CLIP) and the
    K tokens' outputs after ln_post [b, K, width]. No tokens: open_clip's encode_image."""
    transformer = visual.transformer
    k = len(tokens[0]) if tokens else 0
    for j, block in enumerate(transformer.resblocks[start:]):
        if j < len(tokens):
            x = _put_tokens(x, tokens[j], k if j else 0)
        x = run_block(transformer, block, x, None)
    pooled, _ = visual._pool(torch.cat([x[:, :1], x[:, 1 + k :]], dim=1))
    features = pooled if visual.proj is None else pooled @ visual.proj
    return features, visual.ln_post(x[:, 1 : 1 + k])


def text_prefix(text: TextEncoder, prompts: torch.Tensor, start: int) -> torch.Tensor:
    """The hidden states [n, L, width] of prompt embeddings [n, L, width] entering block `start`
    of the text encoder (positional embeddings added, its own mask)."""
    tower = text.tower
    dtype = tower.transformer.get_cast_dtype()
    length = prompts.shape[1]
    x = prompts.to(dtype) + tower.positional_embedding[:length].to(dtype)
    mask = None if tower.attn_mask is None else tower.attn_mask[:length, :length]
    for block in tower.transformer.resblocks[:start]:
        x = run_block(tower.transformer, block, x, mask)
    return x


def text_suffix(
    text: TextEncoder, x: torch.Tensor, eos: torch.Tensor, tokens: Sequence[torch.Tensor], start: int
) -> torch.Tensor:
    """Blocks `start` .. of the text encoder from `text_prefix`'s hidden states, tokens[j] ([K,
    width]) entering block start + j after the start-of-text token; pooled at the end-of-text token,
    now at eos + K. No tokens: open_clip's encode_text (from embeddings)."""
    tower = text.tower
    k = len(tokens[0]) if tokens else 0
    mask = None
    if tower.attn_mask is not None:  # causal, over the grown sequence (the official code's mask)
        length = x.shape[1] + k
        mask = torch.full((length, length), float("-inf"), device=x.device).triu_(1)
    for j, block in enumerate(tower.transformer.resblocks[start:]):
        if j < len(tokens):
            x = _put_tokens(x, tokens[j], k if j else 0)
        x = run_block(tower.transformer, block, x, mask)
    return text.pool(x, eos + k)
