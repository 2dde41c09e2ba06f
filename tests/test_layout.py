"""The source tree cannot shadow installed packages: Python started from the repository root
(``python -c``, ``python -m``, a notebook) imports Hugging Face's ``kernels``, not ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_card_folders_are_not_top_level_packages():
    for folder in ("kernels", "evals"):
        assert (ROOT / folder).is_dir()
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow a package"


def test_peft_and_transformers_import_from_the_repository_root():
    code = (
        "import importlib.util, peft, transformers, llmlite.kernels, llmlite.evals\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    origin = result.stdout.strip().splitlines()[-1]
    # Hugging Face's package when installed (transformers >= 5.25 depends on it), else nothing:
    # never a namespace or package made of the repository's kernels/ folder
    assert origin == "None" or not origin.startswith(str(ROOT / "kernels")), origin
