"""The learnable context of CoOp and the prompt embeddings built from it."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from src.common.messages import one_of

log = logging.getLogger(__name__)

Position = Literal["end", "middle", "front"]
# How many vectors a context initialised from words has: one per word, the phrase's leading tokens
# (the reference), or one per BPE token of the phrase.
InitCount = Literal["words", "tokens"]
POSITIONS = ("end", "middle", "front")
INIT_COUNTS = ("words", "tokens")


def check_context(
    n_ctx: int, ctx_init: str | None, class_token_position: str, ctx_init_count: str = "words"
) -> None:
    """The context options' mistakes (src.train checks them before loading CLIP's weights)."""
    if class_token_position not in POSITIONS:
        raise ValueError(one_of("ctx.class_token_position", class_token_position, POSITIONS))
    if ctx_init_count not in INIT_COUNTS:
        raise ValueError(one_of("ctx.init_count", ctx_init_count, INIT_COUNTS, "words: the reference"))
    if not ctx_init and n_ctx < 1:
        raise ValueError(f"ctx.n_ctx={n_ctx}: the context needs at least 1 vector")


class PromptLearner(nn.Module):
    """Context vectors (unified or class-specific) placed around each class name.

    Prompt of class c: [SOS] [ctx_1 .. ctx_M] [class name tokens] [.] [EOS] (position "end"),
    with the class name in the middle of the context ("middle") or before it ("front").

    Initialised from words (`ctx_init`), the context is the phrase's first tokens, one per word as
    the reference counts (`ctx_init_count="words"`), the rest of the phrase staying fixed text
    before the name ("itap of a": 3 words, 4 tokens, "it ap of" learned, "a" fixed); or all of
    its tokens (`"tokens"`). As in the reference, "middle" and "front" move the first
    name-length tokens after the context, which are then the fixed rest of the phrase and the
    start of the name.
    """

    def __init__(
        self,
        classnames: list[str],
        token_embedding: nn.Embedding,
        tokenize,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_token_position: Position = "end",
        ctx_init_count: InitCount = "words",
        learned_init_tokens: int | None = None,
        zeros_before_init: bool = False,
    ) -> None:
        """`learned_init_tokens`: with `ctx_init`, only its first tokens are learned and the rest stay
        fixed words of every prompt (MaPLe learns "a photo" of "a photo of a {class}.").
        `zeros_before_init`: with `ctx_init`, the context keeps its `n_ctx` vectors, zeros followed by
        the phrase's (ProGrad's initialisation: "X X ... X <phrase> {class}." with the X's zero)."""
        super().__init__()
        check_context(n_ctx, ctx_init, class_token_position, ctx_init_count)
        _check_tokenizer(tokenize)
        names = [name.replace("_", " ") for name in classnames]
        n_cls = len(names)
        width = token_embedding.weight.shape[1]
        # Token ids come from the tokenizer on the CPU; everything built here follows the
        # embedding table's device (the backbone may already sit on a GPU).
        device = token_embedding.weight.device
        with torch.no_grad():
            if ctx_init:
                words = ctx_init.replace("_", " ").strip()
                n_init = _init_length(tokenize, words, ctx_init_count)
                if learned_init_tokens:  # MaPLe: only the leading tokens learn, the rest stays text
                    n_init = min(learned_init_tokens, n_init)
                ctx = token_embedding(tokenize([words]).to(device))[0, 1 : 1 + n_init].float()
                n_zeros = 0
                if zeros_before_init:
                    if n_init > n_ctx:
                        raise ValueError(
                            f"ctx.n_ctx={n_ctx} is shorter than the {n_init} {ctx_init_count} of {words!r} "
                            "that start the context: raise ctx.n_ctx"
                        )
                    n_zeros = n_ctx - n_init
                    ctx = torch.cat([ctx.new_zeros(n_zeros, width), ctx])
                n_ctx = n_zeros + n_init
                if class_specific:
                    log.info("class-specific context: every class starts from %r", words)
                    ctx = ctx.expand(n_cls, -1, -1).clone()
                # the X's stand for the zeros: the rest of the phrase follows the context as text
                prompt_prefix = " ".join(["X"] * n_zeros + [words])
            else:
                shape = (n_cls, n_ctx, width) if class_specific else (n_ctx, width)
                ctx = torch.empty(shape).normal_(std=0.02).to(device)
                prompt_prefix = " ".join(["X"] * n_ctx)
            prompts = [f"{prompt_prefix} {name}." for name in names]
            check_prompts_fit(
                tokenize, prompts, classnames, f"use fewer context vectors (ctx.n_ctx={n_ctx} now)"
            )
            tokens = tokenize(prompts)
            embedding = token_embedding(tokens.to(device)).float()
        self.ctx = nn.Parameter(ctx)  # fp32 always, also under mixed precision
        self.classnames = list(classnames)
        self.n_ctx = n_ctx
        self.class_specific = class_specific
        self.class_token_position = class_token_position
        self.context_length = tokens.shape[1]
        # Frozen parts of the prompts; rebuilt from the tokenizer, so never saved in checkpoints.
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :], persistent=False)
        self.register_buffer("eos", tokens.argmax(dim=-1).to(device), persistent=False)
        self.max_eos = int(tokens.argmax(dim=-1).max())  # read on the host: no device sync per step
        name_lens = [token_count(tokenize, name) for name in names]
        self.register_buffer("order", self._position_order(name_lens).to(device), persistent=False)
        half = n_ctx // 2
        before_name = {"end": n_ctx, "middle": half, "front": 0}[class_token_position]
        # Positions identical for every class: SOS, plus the context before the name if shared.
        self.shared_len = 1 + (0 if class_specific else before_name)

    @property
    def n_cls(self) -> int:
        return len(self.classnames)

    def forward(self, length: int | None = None) -> torch.Tensor:
        """Prompt embeddings [n_cls, length, width], cut after `length` positions."""
        length = length or self.context_length
        ctx = self.ctx if self.class_specific else self.ctx.expand(self.n_cls, -1, -1)
        suffix = self.token_suffix[:, : max(length - 1 - self.n_ctx, 0)]
        prompts = torch.cat([self.token_prefix, ctx, suffix], dim=1)  # the "end" layout
        if self.class_token_position == "end":
            return prompts[:, :length]
        full = prompts.shape[1]
        flat = self.order[:, :length] + full * torch.arange(self.n_cls, device=ctx.device)[:, None]
        return prompts.reshape(-1, prompts.shape[-1])[flat.flatten()].view(self.n_cls, length, -1)

    def _position_order(self, name_lens: list[int]) -> torch.Tensor:
        """Per class, which position of the "end" layout fills each output position."""
        n_ctx, length = self.n_ctx, self.context_length
        ctx = list(range(1, 1 + n_ctx))
        orders = []
        for name_len in name_lens:
            name = list(range(1 + n_ctx, 1 + n_ctx + name_len))
            rest = list(range(1 + n_ctx + name_len, length))
            if self.class_token_position == "middle":
                half = n_ctx // 2
                orders.append([0, *ctx[:half], *name, *ctx[half:], *rest])
            elif self.class_token_position == "front":
                orders.append([0, *name, *ctx, *rest])
            else:
                orders.append(list(range(length)))
        return torch.tensor(orders, dtype=torch.long)


def _init_length(tokenize, words: str, count: InitCount) -> int:
    """Context vectors from the phrase `words`: its word count, as the reference's
    `len(ctx_init.split(" "))`, or its token count."""
    n_tokens = token_count(tokenize, words)
    if count == "tokens":
        return n_tokens
    n_words = len(words.split(" "))
    if n_words > n_tokens:  # e.g. double spaces: the reference would learn the EOS token's vector
        raise ValueError(f"ctx.init={words!r} has {n_words} words but {n_tokens} tokens: use single spaces")
    if n_words < n_tokens:
        log.info(
            "ctx.init=%r: %d words, %d tokens; the first %d tokens are learned",
            words,
            n_words,
            n_tokens,
            n_words,
        )
    return n_words


def check_prompts_fit(tokenize, prompts: list[str], classnames: list[str], fix: str) -> None:
    """Each class's prompt fits the text encoder's context: the tokenizer would cut a longer one
    silently (and the class would train on a prompt without its end), so it is refused, naming the
    class and `fix` (what shortens the prompt besides the class name)."""
    tokens = tokenize(prompts)
    overflowing = [i for i in range(len(prompts)) if int(tokens[i, -1]) != 0]  # no padding left
    if overflowing:
        i = overflowing[0]
        raise ValueError(
            f"class {classnames[i]!r}: its prompt {prompts[i]!r} fills or exceeds the text encoder's "
            f"{tokens.shape[1]} tokens and would be cut: shorten the class name in the dataset's class "
            f"list{', or ' + fix if fix else ''}"
            + (f" ({len(overflowing)} classes are too long)" if len(overflowing) > 1 else "")
        )


def token_count(tokenize, text: str) -> int:
    """Number of BPE tokens of `text` (without SOS/EOS; padding is token id 0)."""
    return int((tokenize([text])[0] != 0).sum()) - 2


def _check_tokenizer(tokenize) -> None:
    """The prompt layout (start token, context, name, end token at the highest id) is that of
    CLIP's BPE tokenizer; others (SigLIP's SentencePiece has no start token) would misplace it."""
    ids = tokenize(["a", "a a"])
    if not (ids[0, 0] == ids[1, 0] and int(ids[0].argmax()) == 2 and int(ids[1].argmax()) == 3):
        raise ValueError(
            "model: its tokenizer does not put a start token first and the end token (highest id) "
            "last, as CLIP's does; learned prompts need an open_clip model with CLIP's tokenizer"
        )
