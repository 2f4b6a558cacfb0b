"""Interpretation: the nearest vocabulary words of each learned context vector, by Euclidean distance
in the token-embedding table of the prompt's own backbone, unified and class-specific."""

from __future__ import annotations

import json

import pytest
import torch

from src.common.files import save_torch
from src.interpret import interpret, main, nearest_tokens
from src.methods.coop import CoOp


def token_id(clip, word: str) -> int:
    return int(clip.tokenize([word])[0, 1])


def prompt_with_words(clip, words: list[str], class_specific: bool) -> dict:
    """A prompt whose context vector at each position is exactly the embedding of a word (for a
    class-specific one: class c gets the words rotated by c)."""
    classnames = ["cat", "dog"]
    state = CoOp(clip, classnames, n_ctx=len(words), class_specific=class_specific).prompt_state()
    table = clip.token_embedding.weight.detach()
    rows = [table[[token_id(clip, w) for w in words[c:] + words[:c]]] for c in range(len(classnames))]
    state["ctx"] = torch.stack(rows) if class_specific else rows[0]
    return state


def test_nearest_tokens_are_the_exact_euclidean_nearest(tiny_clip):
    table = tiny_clip.token_embedding.weight.detach()
    torch.manual_seed(0)
    vectors = torch.randn(5, table.shape[1]) * 0.02
    distances, ids = nearest_tokens(vectors, table, topk=4, chunk=2)
    exact = torch.cdist(vectors, table, compute_mode="donot_use_mm_for_euclid_dist")
    expected, expected_ids = exact.topk(4, dim=1, largest=False)
    assert torch.equal(ids, expected_ids)
    assert torch.allclose(distances, expected, atol=1e-6)
    assert (distances.diff(dim=1) >= 0).all()


def test_unified_context_words(tiny_clip):
    words = interpret(
        prompt_with_words(tiny_clip, ["photo", "of", "cat"], class_specific=False), tiny_clip, topk=3
    )
    assert words["class_specific"] is False and words["topk"] == 3
    (context,) = words["contexts"]
    assert context["classname"] is None and context["nearest_prompt"] == "photo of cat"
    first = context["vectors"][0]
    assert first["position"] == 1
    assert first["nearest"][0] == {"word": "photo", "token_id": token_id(tiny_clip, "photo"), "distance": 0.0}
    assert 0 < first["nearest"][1]["distance"] <= first["nearest"][2]["distance"]


def test_class_specific_context_words(tiny_clip):
    state = prompt_with_words(tiny_clip, ["photo", "of", "cat"], class_specific=True)
    words = interpret(state, tiny_clip, topk=2)
    assert [c["classname"] for c in words["contexts"]] == ["cat", "dog"]
    assert [c["nearest_prompt"] for c in words["contexts"]] == ["photo of cat", "of cat photo"]
    assert all(v["nearest"][0]["distance"] == 0.0 for c in words["contexts"] for v in c["vectors"])


def test_a_context_of_another_width_is_refused(tiny_clip):
    state = prompt_with_words(tiny_clip, ["photo"], class_specific=False)
    state["ctx"] = torch.zeros(1, 512)
    with pytest.raises(ValueError, match="backbone it was learned on"):
        interpret(state, tiny_clip)


@pytest.mark.parametrize("class_specific", [False, True], ids=["unified", "class_specific"])
def test_command_prints_the_table_and_writes_json(cli, capsys, tiny_clip, tmp_path, class_specific):
    ckpt = save_torch(
        tmp_path / "run" / "prompt.pt", prompt_with_words(tiny_clip, ["photo", "of"], class_specific)
    )
    cli(main, [f"ckpt={ckpt}", "topk=2", "seed=0"])  # seed 0 rebuilds tiny_clip's random weights
    written = json.loads((tmp_path / "run" / "nearest_words.json").read_text())
    assert written["ckpt"] == str(ckpt) and written["backbone"] == "coop-tiny"
    assert written["contexts"][0]["nearest_prompt"] == "photo of"
    assert written["contexts"][0]["vectors"][0]["nearest"][0]["distance"] == 0.0
    shown = capsys.readouterr().out
    assert "photo (0.000)" in shown and ("dog" in shown) == class_specific


def test_a_last_checkpoint_writes_into_its_run_folder(cli, tiny_clip, tmp_path):
    module = CoOp(tiny_clip, ["cat", "dog"], n_ctx=2)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)  # what Lightning's last.ckpt holds
    last = save_torch(tmp_path / "run" / "checkpoints" / "last.ckpt", checkpoint)
    cli(main, [f"ckpt={last}", "topk=2", "seed=0"])
    written = json.loads((tmp_path / "run" / "nearest_words.json").read_text())
    assert written == {**interpret(module.prompt_state(), tiny_clip, topk=2), "ckpt": str(last)}


def test_mistakes_stop_it_before_the_backbone_is_built(cli, capsys, tiny_clip, tmp_path, monkeypatch):
    """A mistyped ckpt= and an out= that cannot be written are one line each, found before the
    backbone loads; nothing is written."""
    import open_clip

    ckpt = save_torch(tmp_path / "run" / "prompt.pt", prompt_with_words(tiny_clip, ["photo"], False))
    (tmp_path / "a_file").write_text("")

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built")

    monkeypatch.setattr(open_clip, "create_model", no_backbone)
    typo, blocked = tmp_path / "rn" / "prompt.pt", tmp_path / "a_file" / "w.json"
    for args, expected in [
        ([f"ckpt={typo}"], f"ckpt={typo}: no such file"),
        ([f"ckpt={ckpt}", f"out={blocked}"], f"out={blocked} cannot be written ({blocked.parent} is a file)"),
    ]:
        with pytest.raises(SystemExit):
            cli(main, args)
        (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert error.startswith(f"error: {expected}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "run"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["prompt.pt"]
