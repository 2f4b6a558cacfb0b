"""The method: prompts and text features exactly as in the paper, and the EOS cut is exact."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from src.models.clip import FrozenCLIP
from src.models.prompt_learner import PromptLearner

CLASSNAMES = ["golden_retriever", "tabby cat", "airliner", "great white shark", "bell pepper"]


@pytest.fixture(scope="module")
def vit_b32() -> FrozenCLIP:
    torch.manual_seed(0)
    return FrozenCLIP("ViT-B-32", None)


def encode(clip: FrozenCLIP, learner: PromptLearner, fast: bool) -> torch.Tensor:
    """Text features in fast mode or in the reference's plain 77-position mode."""
    saved = clip.text.path
    clip.text.path = "grouped" if fast else "reference"
    try:
        prompts = learner(clip.text.prompt_length(learner.eos))
        return clip.text(prompts, learner.eos, learner.shared_len)
    finally:
        clip.text.path = saved


def learner_for(clip: FrozenCLIP, **kwargs) -> PromptLearner:
    return PromptLearner(CLASSNAMES, clip.token_embedding, clip.tokenize, **kwargs)


@pytest.mark.parametrize("arch", ["tiny", "vit_b32"])
@pytest.mark.parametrize(
    "position, text",
    [
        ("end", "a photo of a {}."),
        ("middle", "a photo {} of a."),  # half of the 4 context words before the name
        ("front", "{} a photo of a."),
    ],
)
@pytest.mark.parametrize("fast", [False, True])
def test_init_from_words_equals_open_clip_encode_text(arch, position, text, fast, request):
    clip = request.getfixturevalue("tiny_clip" if arch == "tiny" else "vit_b32")
    learner = learner_for(clip, ctx_init="a photo of a", class_token_position=position)
    assert learner.n_ctx == 4
    names = [c.replace("_", " ") for c in CLASSNAMES]
    with torch.no_grad():
        expected = clip.model.encode_text(clip.tokenize([text.format(n) for n in names]))
        got = encode(clip, learner, fast)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("class_specific", [False, True])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_logits_equal_with_and_without_eos_cut(tiny_clip, class_specific, position):
    torch.manual_seed(1)
    learner = learner_for(tiny_clip, n_ctx=8, class_specific=class_specific, class_token_position=position)
    images = torch.randn(6, tiny_clip.model.text_projection.shape[1])
    with torch.no_grad():
        full = F.normalize(encode(tiny_clip, learner, fast=False), dim=-1)
        cut = F.normalize(encode(tiny_clip, learner, fast=True), dim=-1)
    assert tiny_clip.text.prompt_length(learner.eos) < learner.context_length
    logits_full = tiny_clip.logit_scale * F.normalize(images, dim=-1) @ full.t()
    logits_cut = tiny_clip.logit_scale * F.normalize(images, dim=-1) @ cut.t()
    torch.testing.assert_close(logits_cut, logits_full, rtol=0, atol=1e-5)


def test_context_shapes_and_init(tiny_clip):
    torch.manual_seed(0)
    unified = learner_for(tiny_clip, n_ctx=16)
    csc = learner_for(tiny_clip, n_ctx=16, class_specific=True)
    width = tiny_clip.token_embedding.weight.shape[1]
    assert unified.ctx.shape == (16, width)
    assert csc.ctx.shape == (len(CLASSNAMES), 16, width)
    assert unified.ctx.std().item() == pytest.approx(0.02, rel=0.15)
    assert unified.ctx.dtype == torch.float32
    words = learner_for(tiny_clip, ctx_init="a photo of a")
    expected = tiny_clip.token_embedding(tiny_clip.tokenize(["a photo of a"]))[0, 1:5]
    torch.testing.assert_close(words.ctx.data, expected)
    csc_words = learner_for(tiny_clip, ctx_init="a photo of a", class_specific=True)
    assert csc_words.ctx.shape == (len(CLASSNAMES), 4, width)


def test_prompt_tokens_follow_the_reference_layout(tiny_clip):
    learner = learner_for(tiny_clip, n_ctx=4)
    tokens = tiny_clip.tokenize(["X X X X golden retriever."])[0]
    eos = int(tokens.argmax())
    assert learner.eos[0] == eos
    # class names: "_" becomes " "; the frozen suffix is the name, ".", EOS and padding
    suffix = tiny_clip.token_embedding(tokens)[1 + 4 :]
    torch.testing.assert_close(learner.token_suffix[0], suffix)
    assert learner.shared_len == 5
    assert learner_for(tiny_clip, n_ctx=4, class_specific=True).shared_len == 1
    assert learner_for(tiny_clip, n_ctx=4, class_token_position="middle").shared_len == 3


def test_bad_context_settings_are_refused(tiny_clip):
    with pytest.raises(ValueError, match="ctx.n_ctx=0"):
        learner_for(tiny_clip, n_ctx=0)
    with pytest.raises(ValueError, match="ctx.class_token_position='side'"):
        learner_for(tiny_clip, class_token_position="side")


def test_imagenet_names_are_encoded_exactly(tiny_clip):
    """Many classes of many prompt lengths: grouping by length changes nothing."""
    names = open_clip.IMAGENET_CLASSNAMES[:60]
    learner = PromptLearner(names, tiny_clip.token_embedding, tiny_clip.tokenize, n_ctx=16)
    assert len(torch.unique(learner.eos)) > 3
    with torch.no_grad():
        torch.testing.assert_close(
            encode(tiny_clip, learner, fast=True), encode(tiny_clip, learner, fast=False), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("words, n_words, n_tokens", [("itap of a", 3, 4), ("a photo of a", 4, 4)])
def test_word_init_learns_one_vector_per_word_or_per_token(tiny_clip, words, n_words, n_tokens):
    assert learner_for(tiny_clip, ctx_init=words).n_ctx == n_words  # the reference's count
    assert learner_for(tiny_clip, ctx_init=words, ctx_init_count="tokens").n_ctx == n_tokens
    phrase = tiny_clip.token_embedding(tiny_clip.tokenize([words]))[0]
    torch.testing.assert_close(learner_for(tiny_clip, ctx_init=words).ctx.data, phrase[1 : 1 + n_words])
    with pytest.raises(ValueError, match="'letters': use ctx.init_count=words or ctx.init_count=tokens"):
        learner_for(tiny_clip, ctx_init=words, ctx_init_count="letters")


def original_prompt_ids(clip: FrozenCLIP, words: str, name: str, position: str) -> torch.Tensor:
    """The token ids of the prompt that the reference's PromptLearner (CoOp, trainers/coop.py) builds
    from `words` before training, written out from its code: n_ctx = len(words.split(" ")); the
    prompt "words name." tokenized; prefix = [SOS], ctx = the n_ctx tokens after it, suffix = the
    rest; "middle" and "front" move suffix[:name_len], name_len = the name's token count."""
    ids = clip.tokenize([f"{words} {name}."])[0]
    n_ctx = len(words.split(" "))
    name_len = int((clip.tokenize([name])[0] != 0).sum()) - 2
    prefix, ctx, suffix = ids[:1], ids[1 : 1 + n_ctx], ids[1 + n_ctx :]
    if position == "end":
        return torch.cat([prefix, ctx, suffix])
    if position == "middle":
        half = n_ctx // 2
        return torch.cat([prefix, ctx[:half], suffix[:name_len], ctx[half:], suffix[name_len:]])
    return torch.cat([prefix, suffix[:name_len], ctx, suffix[name_len:]])


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_word_init_with_more_tokens_than_words_is_the_references_prompt(tiny_clip, position):
    """ "itap of a": "it ap of" learned, "a" fixed text before the name, placed as the reference does."""
    learner = learner_for(tiny_clip, ctx_init="itap of a", class_token_position=position)
    names = [c.replace("_", " ") for c in CLASSNAMES]
    ids = torch.stack([original_prompt_ids(tiny_clip, "itap of a", n, position) for n in names])
    with torch.no_grad():
        expected = tiny_clip.model.encode_text(ids)
        got = encode(tiny_clip, learner, fast=True)  # equal to the plain path: test_exactness
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if position == "end":  # the reference's initial prompt is the phrase itself
        with torch.no_grad():
            text = tiny_clip.model.encode_text(tiny_clip.tokenize([f"itap of a {n}." for n in names]))
        torch.testing.assert_close(got, text, rtol=0, atol=1e-5)
