"""Other open_clip families: a SigLIP-like tower (no causal mask, last-token pooling, projection
bias, a logit bias) falls back to the plain text path, matches open_clip and trains with CoOp."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from src.methods.coop import CoOp
from src.models.clip import FrozenCLIP
from src.models.prompt_learner import PromptLearner

CLASSNAMES = ["cat", "dog", "sports car"]


@pytest.fixture(scope="module")
def siglike() -> FrozenCLIP:
    torch.manual_seed(0)
    return FrozenCLIP("coop-tiny-siglike", None)


def test_non_causal_last_token_tower_falls_back_and_matches_open_clip(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        clip = FrozenCLIP("coop-tiny-siglike", None)
    assert "reference full-length text computation" in caplog.text
    assert not clip.text.fast and clip.text.pool_type == "last" and clip.text.tower.attn_mask is None
    coop = CoOp(clip, CLASSNAMES, ctx_init="a photo of a")
    tokens = clip.tokenize([f"a photo of a {name}." for name in CLASSNAMES])
    with torch.no_grad():
        torch.testing.assert_close(coop.text_features(), clip.model.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_coop_trains_and_the_logit_bias_cancels_in_the_softmax(siglike):
    torch.manual_seed(0)
    coop = CoOp(siglike, CLASSNAMES, n_ctx=4)
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6) % 3
    with torch.no_grad():
        features = siglike.encode_image(images)
        text = coop.text_features()
        # open_clip's SigLIP logits: scale * cos + bias (trained with a sigmoid loss); the bias is the
        # same for every class, so CoOp's softmax over scale * cos gives the same probabilities.
        biased = siglike.logit_scale * F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).t()
        biased = biased + siglike.model.logit_bias
        torch.testing.assert_close(coop.logits(features, text).softmax(-1), biased.softmax(-1))
    optimizer = torch.optim.SGD([coop.prompt_learner.ctx], lr=1.0)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(coop(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01


def test_tokenizer_without_a_start_token_is_refused(tiny_clip):
    def sentencepiece_like(texts):  # SigLIP's layout: the words first, then the end token
        ids = tiny_clip.tokenize(texts)[:, 1:]
        return torch.cat([ids, torch.zeros(len(ids), 1, dtype=ids.dtype)], dim=1)

    with pytest.raises(ValueError, match="CLIP's tokenizer"):
        PromptLearner(CLASSNAMES, tiny_clip.token_embedding, sentencepiece_like)
