"""Every fast path of the text encoder computes exactly what the reference computes: logits and
the context gradient within 1e-5 (fp32), on the tiny model and on a random ViT-B-32."""

from __future__ import annotations

import itertools

import open_clip
import pytest
import torch
import torch.nn.functional as F

from src.methods.coop import CoOp
from src.models.clip import FrozenCLIP
from src.models.text_encoder import TextEncoder

# names of 1 to 5 tokens, so that prompts of several lengths are grouped
CLASSNAMES = ["tench", "goldfish", "great white shark", "tiger_shark", "hammerhead", "electric ray", "Komodo"]
# the CPU path (EOS cut, length groups, shared prefix), the GPU path (one pass cut at the longest
# EOS; for these few classes without, and then forced with, the shared prefix run apart and
# attended through scaled_dot_product_attention), each also in chunks of 2 classes
FAST_PATHS = [
    {"path": "grouped"},
    {"path": "grouped", "chunk": 2},
    {"path": "batched"},
    {"path": "batched", "chunk": 2, "prefix_min_tokens": 0},
]


@pytest.fixture(scope="module")
def vit_b32() -> FrozenCLIP:
    torch.manual_seed(0)
    return FrozenCLIP("ViT-B-32", None)


def logits_and_grad(clip: FrozenCLIP, encoder: TextEncoder, module: CoOp, images, labels):
    clip.text = encoder
    module.prompt_learner.ctx.grad = None
    logits = module.logits(images, module.text_features())
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), module.prompt_learner.ctx.grad.clone()


@pytest.mark.parametrize("arch", ["tiny", "vit_b32"])
@pytest.mark.parametrize(
    "class_specific, position, init",
    list(itertools.product([False, True], ["end", "middle", "front"], [None, "a photo of a"])),
)
def test_fast_paths_equal_reference(arch, class_specific, position, init, request):
    clip = request.getfixturevalue("tiny_clip" if arch == "tiny" else "vit_b32")
    names = CLASSNAMES if arch == "tiny" else CLASSNAMES[:4]  # the 77-position reference is slow
    assert_fast_paths_equal_reference(
        clip, names, ctx_init=init, class_specific=class_specific, class_token_position=position
    )


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_fast_paths_equal_reference_with_fixed_words_after_the_context(tiny_clip, position):
    """ "itap of a": 3 words learned as the first 3 of its 4 tokens, "a" fixed text after them."""
    assert_fast_paths_equal_reference(
        tiny_clip, CLASSNAMES, ctx_init="itap of a", class_token_position=position
    )


def assert_fast_paths_equal_reference(clip: FrozenCLIP, names: list[str], **module_kwargs) -> None:
    original = clip.text
    torch.manual_seed(0)
    module = CoOp(clip, names, n_ctx=8, **module_kwargs)
    width = original.tower.text_projection.shape[1]
    images = torch.randn(12, width)
    labels = torch.arange(12) % len(names)
    try:
        reference = logits_and_grad(clip, TextEncoder(clip.model, path="reference"), module, images, labels)
        for options in FAST_PATHS:
            encoder = TextEncoder(clip.model, **options)
            assert encoder.prefix_sharing
            logits, grad = logits_and_grad(clip, encoder, module, images, labels)
            torch.testing.assert_close(logits, reference[0], rtol=0, atol=1e-5)
            # fp32 sums run in another order: 1e-5 of the gradient's own scale
            scale = max(1.0, reference[1].abs().max().item())
            assert (grad - reference[1]).abs().max().item() <= 1e-5 * scale
    finally:
        clip.text = original


def test_reference_mode_runs_all_77_positions(tiny_clip):
    encoder = TextEncoder(tiny_clip.model, path="reference")
    eos = torch.tensor([20, 25])
    assert encoder.prompt_length(eos) == 77
    for path in ("auto", "grouped", "batched"):
        assert TextEncoder(tiny_clip.model, path=path).prompt_length(eos) == 26


def test_auto_path_is_grouped_on_cpu_and_batched_on_gpus(tiny_clip, caplog):
    encoder = TextEncoder(tiny_clip.model)
    assert encoder.path == "auto"
    assert encoder.resolved_path("cpu") == "grouped"
    assert encoder.resolved_path("cuda") == encoder.resolved_path("meta") == "batched"
    assert TextEncoder(tiny_clip.model, path="batched").resolved_path("cpu") == "batched"
    prompts = torch.randn(2, 26, tiny_clip.token_embedding.weight.shape[1])
    with caplog.at_level("INFO", logger="src.models.text_encoder"):
        encoder(prompts, torch.tensor([20, 25]))
        encoder(prompts, torch.tensor([20, 25]))
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["text encoder: grouped path on cpu (model.text_path=auto)"]


def test_text_path_option_and_its_former_switch(tiny_clip):
    assert FrozenCLIP("coop-tiny", None, text_fast=False).text.path == "reference"
    assert FrozenCLIP("coop-tiny", None, text_path="batched").text.path == "batched"
    with pytest.raises(ValueError, match="'fast': use model.text_path=auto, model.text_path=grouped"):
        TextEncoder(tiny_clip.model, path="fast")


def test_towers_without_causal_mask_fall_back_to_the_plain_computation():
    model = open_clip.create_model("coop-tiny")
    model.attn_mask = None  # e.g. a bidirectional text tower
    encoder = TextEncoder(model, path="batched")
    assert encoder.path == "reference" and not encoder.fast and not encoder.prefix_sharing
    assert encoder.prompt_length(torch.tensor([20])) == 77


def test_batched_path_runs_the_prefix_apart_only_where_it_saves_enough_positions(tiny_clip, monkeypatch):
    calls = []
    original = TextEncoder._prefix_keys_values
    monkeypatch.setattr(
        TextEncoder, "_prefix_keys_values", lambda self, x: calls.append(tuple(x.shape)) or original(self, x)
    )
    width = tiny_clip.token_embedding.weight.shape[1]
    prompts, eos = torch.randn(3, 12, width), torch.tensor([9, 10, 11])
    TextEncoder(tiny_clip.model, path="batched")(prompts, eos, shared_len=5)  # saves 3 x 4 positions
    assert calls == []
    TextEncoder(tiny_clip.model, path="batched", prefix_min_tokens=12)(prompts, eos, shared_len=5)
    assert calls == [(1, 5, width)]


@pytest.mark.parametrize("class_specific", [False, True])
def test_a_stack_of_runs_prompts_equals_each_run_alone(tiny_clip, class_specific):
    """Packed runs (src/packing/train.py): 3 runs' prompts [runs, n, L, width] in one call of every path,
    chunked or not, give each run's features and gradients of the reference path run by run."""
    torch.manual_seed(0)
    modules = [CoOp(tiny_clip, CLASSNAMES, n_ctx=8, class_specific=class_specific) for _ in range(3)]
    reference_encoder = TextEncoder(tiny_clip.model, path="reference")

    def features_and_grads(encode) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for module in modules:
            module.prompt_learner.ctx.grad = None
        features = encode()
        (features * torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
        return features.detach(), [module.prompt_learner.ctx.grad.clone() for module in modules]

    def alone():
        return torch.stack([reference_encoder(*m.text_inputs()) for m in modules])

    expected, expected_grads = features_and_grads(alone)
    for options in FAST_PATHS:
        encoder = TextEncoder(tiny_clip.model, **options)

        def stacked(encoder=encoder):
            inputs = [m.text_inputs() for m in modules]
            _, eos, shared_len = inputs[0]
            return encoder(torch.stack([prompts for prompts, _, _ in inputs]), eos, shared_len)

        features, grads = features_and_grads(stacked)
        torch.testing.assert_close(features, expected, rtol=0, atol=1e-5, msg=str(options))
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            # fp32 sums run in another order: 1e-5 of the gradient's own scale
            scale = max(1.0, expected_grad.abs().max().item())
            assert (grad - expected_grad).abs().max().item() <= 1e-5 * scale, (options, scale)
