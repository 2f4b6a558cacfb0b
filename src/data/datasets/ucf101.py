"""UCF101 middle frames: ucf101/UCF-101-midframes/<Action_Name>/<video>.jpg, split_zhou_UCF101.json.

Without the split file, as the reference: ucfTrainTestlist/classInd.txt (the classes),
trainlist01.txt split 80/20 per class into train/val, testlist01.txt as test; the video
`ApplyEyeMakeup/v_x.avi` is the frame `Apply_Eye_Makeup/v_x.jpg`, class name "Apply_Eye_Makeup".
"""

from __future__ import annotations

import re

from src.data.datasets.base import DatasetError, SplitFileReader, split_off
from src.data.samples import Sample


class UCF101(SplitFileReader):
    name = "ucf101"
    folder = "ucf101"
    split_file = "split_zhou_UCF101.json"
    image_dir = "UCF-101-midframes"
    split_rule = "trainlist01.txt split 80/20 per class into train/val, testlist01.txt as test"

    def make_split(self) -> tuple[list[Sample], list[Sample], list[Sample]]:
        index = self.require(self.root / "ucfTrainTestlist" / "classInd.txt", "the class list of UCF101")
        labels = {}
        for line in index.read_text().splitlines():
            if line.strip():
                number, action = line.split()
                labels[action] = int(number) - 1
        train, val = split_off(self._read_list("trainlist01.txt", labels), 0.2)
        return train, val, self._read_list("testlist01.txt", labels)

    def _read_list(self, name: str, labels: dict[str, int]) -> list[Sample]:
        """Lines `ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi [label]`."""
        path = self.require(self.root / "ucfTrainTestlist" / name, "an official split list of UCF101")
        items = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            action, video = line.split()[0].split("/")
            if action not in labels:
                raise DatasetError(f"{path}: action {action!r} is not in classInd.txt: fix either file")
            classname = "_".join(re.findall("[A-Z][^A-Z]*", action))
            frame = video.rsplit(".", 1)[0] + ".jpg"
            items.append(Sample(str(self.images / classname / frame), labels[action], classname))
        return items
