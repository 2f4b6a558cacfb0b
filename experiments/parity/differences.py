"""The largest differences between the project's methods and the official fixtures, as a table.

    PYTHONPATH=. python experiments/parity/differences.py [method ...]

Runs the comparisons of tests/test_parity.py (the same checks, which fail above their tolerances)
and prints, per method, the largest difference of the logits, of each loss term, of each learned
parameter's gradient (relative to its largest magnitude) and of the learning rates (relative).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.parity.common import project_clip  # noqa: E402
from tests.test_parity import PARITY  # noqa: E402


def main() -> None:
    names = sys.argv[1:] or sorted(PARITY)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            compare, model = PARITY[name]
            diffs = compare(project_clip(model), Path(tmp))
        print(f"| {name} | " + ", ".join(f"{key} {value:.1e}" for key, value in diffs.items()) + " |")


if __name__ == "__main__":
    main()
