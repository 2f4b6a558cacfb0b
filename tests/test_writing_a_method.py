"""docs/writing_a_method.md: everything it names is public and documented, the frozen CLIP's API
does what it says, and its example method (not CoOp's child) trains as written."""

from __future__ import annotations

import importlib
import inspect
import re
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from src.methods.base import Method, MethodOptionError
from src.methods.schedules import RunLength

PAGE = Path(__file__).resolve().parents[1] / "docs" / "writing_a_method.md"


def named(path: str) -> object:
    """The object a dotted path names: a module, then attributes (a property stays a property)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = inspect.getattr_static(obj, attr)
        return obj
    raise ImportError(path)


def test_every_name_on_the_page_is_public_and_documented():
    names = sorted(set(re.findall(r"`(src\.[\w.]+)`", PAGE.read_text())))
    assert len(names) > 20
    for path in names:
        assert not any(part.startswith("_") for part in path.split(".")), path
        obj = named(path)
        doc = obj.fget.__doc__ if isinstance(obj, property) else getattr(obj, "__doc__", None)
        if isinstance(obj, (classmethod, staticmethod)):
            doc = obj.__func__.__doc__
        assert doc and doc.strip(), f"{path} has no docstring"


def test_the_frozen_clips_api(tiny_clip):
    texts = ["a photo of a cat.", "a dog."]
    tokens = tiny_clip.tokenize(texts)
    assert tokens.shape == (2, tiny_clip.context_length) and tiny_clip.context_length == 77
    with torch.no_grad():
        reference = tiny_clip.encode_text(tokens)
        eos = tokens.argmax(dim=-1)
        fast = tiny_clip.text(tiny_clip.token_embedding(tokens), eos)  # prompt embeddings, fast path
        images = torch.randn(3, 3, tiny_clip.image_size, tiny_clip.image_size)
        image = tiny_clip.encode_image(images)
    assert reference.shape == (2, tiny_clip.embed_dim) and image.shape == (3, tiny_clip.embed_dim)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert tiny_clip.token_embedding.weight.shape[1] == tiny_clip.text_width
    assert torch.equal(tiny_clip.image_features(image), image)  # cached features pass through
    assert tiny_clip.device == torch.device("cpu") and tiny_clip.dtype == torch.float32
    assert float(tiny_clip.logit_scale) == pytest.approx(float(tiny_clip.model.logit_scale.exp()))


def example_class() -> type[Method]:
    """The page's example, run as written."""
    (code,) = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(code, str(PAGE), "exec"), namespace)  # noqa: S102  (the page's own code)
    return namespace["BiasedZeroShot"]


def test_the_pages_example_trains_with_the_contracts_step(tiny_clip):
    cls = example_class()
    names = ["cat", "dog", "car"]
    with pytest.raises(MethodOptionError, match="method.module.template='a photo': put {} where"):
        cls.create(tiny_clip, names, template="a photo")
    module = cls.create(tiny_clip, names)
    module.use_recipe(partial(torch.optim.SGD, lr=2.0))  # the config's `optimizer`, as a run gives it
    assert module.transfers and not module.learns_context  # the contract's defaults
    torch.manual_seed(0)
    features, labels = (
        torch.randn(12, tiny_clip.embed_dim),
        torch.tensor([0] * 10 + [1, 2]),
    )  # a prior to learn
    optimizer = module.optimization(RunLength(epochs=1, steps=20))  # no schedule: the optimiser
    losses = []
    for _ in range(20):
        loss = module.training_step((features, labels), 0)  # the contract's one step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.01
    with torch.no_grad():
        expected = F.cross_entropy(module(features), labels)
    assert float(module.training_step((features, labels), 0)) == pytest.approx(float(expected))
