"""Prediction: class probabilities of one's own images under a learned prompt (the softmax of the
method's logits on the test transform), printed and written as CSV; unreadable images are listed
and skipped."""

from __future__ import annotations

import logging
import random

import pandas as pd
import pytest
import torch
from PIL import Image

from src.common.files import save_torch
from src.data.transforms import eval_transform
from src.methods.coop import CoOp
from src.predict import image_files, main, predict_probabilities, top_classes

CLASSNAMES = ["cat", "dog", "bird"]


@pytest.fixture
def photos(tmp_path):
    """Three photos (one in a subfolder, one a PNG), a broken "jpg" and a text file."""
    folder = tmp_path / "photos"
    rng = random.Random(0)
    for name, size in [("a.jpg", (40, 30)), ("sub/b.png", (20, 50)), ("c.JPG", (32, 32))]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", size)
        image.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size[0] * size[1])])
        image.save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not a photo")
    return folder


@pytest.fixture(params=[False, True], ids=["unified", "class_specific"])
def module(request, tiny_clip):
    torch.manual_seed(1)
    return CoOp(tiny_clip, CLASSNAMES, n_ctx=4, class_specific=request.param)


def test_probabilities_are_the_softmax_of_the_module_logits(module, photos):
    files = image_files(photos)
    assert [f.relative_to(photos).as_posix() for f in files] == ["a.jpg", "broken.jpg", "c.JPG", "sub/b.png"]
    done, probabilities, unreadable = predict_probabilities(module, files, batch_size=2)
    assert [f.name for f in done] == ["a.jpg", "c.JPG", "b.png"]
    assert (
        list(unreadable) == [photos / "broken.jpg"] and "cannot identify" in unreadable[photos / "broken.jpg"]
    )
    assert probabilities.shape == (3, 3)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(3), atol=1e-6)
    transform = eval_transform(module.clip.image_size)
    images = torch.stack([transform(Image.open(f)) for f in done])
    with torch.no_grad():
        expected = module(images).softmax(dim=-1)
    assert torch.allclose(probabilities, expected, atol=1e-6)


def test_top_classes_table():
    probabilities = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    table = top_classes(["x.jpg", "y.jpg"], probabilities, CLASSNAMES, topk=2)
    assert list(table.columns) == ["path", "class_1", "prob_1", "class_2", "prob_2"]
    assert table["class_1"].tolist() == ["dog", "cat"] and table["class_2"].tolist() == ["bird", "bird"]
    assert table["prob_1"].tolist() == pytest.approx([0.5, 0.6])
    assert list(top_classes(["x.jpg"], probabilities[:1], CLASSNAMES, topk=9).columns)[-1] == "prob_3"


def test_command_writes_csv_and_reports_unreadable_images(cli, capsys, caplog, module, photos, tmp_path):
    ckpt = save_torch(tmp_path / "prompt.pt", module.prompt_state())
    out = tmp_path / "predictions.csv"
    with caplog.at_level(logging.WARNING):
        cli(main, [f"ckpt={ckpt}", f"input={photos}", "topk=2", "seed=0", f"out={out}"])  # seed 0: tiny_clip
    table = pd.read_csv(out)
    assert table["path"].tolist() == [str(photos / "a.jpg"), str(photos / "c.JPG"), str(photos / "sub/b.png")]
    assert set(table["class_1"]) <= set(CLASSNAMES)
    assert (table["prob_1"] >= table["prob_2"]).all() and (
        table["prob_1"] + table["prob_2"] <= 1 + 1e-6
    ).all()
    _, probabilities, _ = predict_probabilities(module, [photos / "a.jpg"])
    assert table["prob_1"][0] == pytest.approx(probabilities.max().item(), abs=1e-6)
    assert "1 of 4 images could not be read and were skipped" in caplog.text and "broken.jpg" in caplog.text
    shown = capsys.readouterr().out
    assert "sub/b.png" in shown and str(photos) not in shown  # paths in the folder given


def test_bad_input_is_one_line(cli, capsys, module, tmp_path):
    ckpt = save_torch(tmp_path / "prompt.pt", module.prompt_state())
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"broken")
    for given, expected in [
        (tmp_path / "missing", "missing: no such file or folder; give an image or a folder of images"),
        (tmp_path / "empty", "empty: no image files in this folder"),
        (tmp_path / "bad", "bad: none of the 1 images could be read"),
    ]:
        with pytest.raises(SystemExit):
            cli(main, [f"ckpt={ckpt}", f"input={given}", f"out={tmp_path / 'p.csv'}"])
        (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert expected in error
    assert not (tmp_path / "p.csv").exists()


def test_a_run_folder_with_only_its_last_checkpoint(cli, module, photos, tmp_path):
    """An unfinished run (checkpoints/last.ckpt, no prompt.pt yet) predicts like its prompt file, and
    predictions.csv goes into the run folder, not the current one."""
    run = tmp_path / "run"
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)  # what Lightning's last.ckpt holds
    save_torch(run / "checkpoints" / "last.ckpt", checkpoint)
    cli(main, [f"ckpt={run}", f"input={photos}", "topk=2", "seed=0"])
    from_run = pd.read_csv(run / "predictions.csv")
    save_torch(tmp_path / "prompt.pt", module.prompt_state())
    cli(main, [f"ckpt={tmp_path / 'prompt.pt'}", f"input={photos}", "topk=2", "seed=0"])
    pd.testing.assert_frame_equal(from_run, pd.read_csv(tmp_path / "predictions.csv"))
