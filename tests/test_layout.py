"""The layout tells the architecture: the commands at src/'s root, then packages in floors, each
importing only the floors below it (no import running back up, no loop between packages); the
configs' resolvers import neither Lightning nor the method contract."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# From the ground up (models stands on data: its tiny CLIP is pre-trained on the digits).
FLOORS = (("common",), ("data",), ("models",), ("methods",), ("run",), ("packing",))
COMMANDS = {"train", "eval", "protocols", "report", "predict", "interpret", "export"}


def floor(package: str) -> int:
    """A package's floor."""
    return next((i for i, names in enumerate(FLOORS) if package in names), len(FLOORS))


def project_imports(file: Path) -> set[str]:
    """The `src.` modules a file imports, anywhere in it (a function's imports too)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("src.")}


def test_src_holds_the_commands_and_the_packages():
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert modules == COMMANDS
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {name for names in FLOORS for name in names}


def test_every_import_runs_down_a_floor():
    upward = []
    for file in SRC.rglob("*.py"):
        parts = file.relative_to(SRC).parts
        if len(parts) == 1:
            continue  # a command: above every package
        for module in project_imports(file):
            target = module.split(".")[1]
            if target != parts[0] and (target in COMMANDS or floor(target) >= floor(parts[0])):
                upward.append(f"{file.relative_to(ROOT)} -> {module}")
    assert upward == []


def test_the_config_resolvers_import_neither_lightning_nor_the_contract():
    probe = (
        "import sys, src.run.config; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning')"
        " or m == 'src.methods.base'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
