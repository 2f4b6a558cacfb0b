"""`python -m src.data.prepare NAME --data-dir DIR`: what is present, what is missing and how to get
it; torchvision downloads land in place whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.data import prepare
from tests.miniature import make_dtd, make_sun397, write_image


def run(capsys, *args: str) -> tuple[int, str]:
    code = prepare.main(list(args))
    return code, capsys.readouterr().out


def test_ready_dataset_is_read(tmp_path, capsys):
    make_dtd(tmp_path)
    code, out = run(capsys, "dtd", "--data-dir", str(tmp_path))
    assert code == 0
    assert "✓ images: present" in out and "✓ split_zhou_DescribableTextures.json: present" in out
    assert "ready: 6 train, 3 val, 6 test images, 3 classes" in out


def test_missing_pieces_say_exactly_how_to_get_them(tmp_path, capsys):
    code, out = run(capsys, "oxford_pets", "--data-dir", str(tmp_path))
    assert code == 1 and f"{tmp_path / 'oxford_pets'} (no such folder)" in out
    assert (
        "✗ images: missing; extract https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz here" in out
    )
    assert "https://drive.google.com/file/d/1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs/view?usp=sharing" in out
    assert f"python -m src.data.prepare oxford_pets --data-dir {tmp_path} --download" in out


def test_absent_split_file_is_made_from_the_official_lists(tmp_path, capsys):
    root = make_sun397(tmp_path)
    (root / "split_zhou_SUN397.json").unlink()
    code, out = run(capsys, "sun397", "--data-dir", str(tmp_path))
    assert code == 0 and "split_zhou_SUN397.json: absent: made on first use" in out
    assert "ready: 12 train, 3 val, 6 test images, 3 classes" in out
    assert (root / "split_zhou_SUN397.json").is_file()


def fake_dtd_download(dataset: str, into: Path) -> None:
    """What torchvision.datasets.DTD(into, download=True) leaves: into/dtd/dtd/{images,labels,imdb}."""
    assert dataset == "DTD"
    data = into / "dtd" / "dtd"
    for label, name in enumerate(["banded", "blotchy"]):
        for i in range(5):
            write_image(data / "images" / name / f"{name}_{i:04d}.jpg", label, i)
    for folder in ("labels", "imdb"):
        (data / folder).mkdir()
        (data / folder / "x.txt").write_text("x\n")


def test_download_moves_the_pieces_into_the_reference_layout(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare, "fetch_with_torchvision", fake_dtd_download)
    code, out = run(capsys, "dtd", "--data-dir", str(tmp_path), "--download")
    assert code == 0 and "placed images" in out
    assert len(list((tmp_path / "dtd" / "images" / "banded").iterdir())) == 5
    assert "ready: 4 train, 2 val, 4 test images, 2 classes" in out  # split made 50/20/30
    assert [p.name for p in tmp_path.iterdir()] == ["dtd"]  # no staging folder left


def test_interrupted_download_leaves_no_partial_files(tmp_path, capsys, monkeypatch):
    def interrupted(dataset: str, into: Path) -> None:
        write_image(into / "dtd" / "dtd" / "images" / "banded" / "half.jpg", 0, 0)
        raise OSError("connection reset")

    monkeypatch.setattr(prepare, "fetch_with_torchvision", interrupted)
    with pytest.raises(OSError, match="connection reset"):
        prepare.main(["dtd", "--data-dir", str(tmp_path), "--download"])
    assert list(tmp_path.iterdir()) == []


def test_no_torchvision_downloader(tmp_path, capsys):
    code, out = run(capsys, "imagenet", "--data-dir", str(tmp_path), "--download")
    assert code == 1 and "torchvision has no downloader for imagenet" in out
    assert "https://image-net.org/download.php" in out
