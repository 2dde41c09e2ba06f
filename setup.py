"""Everything is in pyproject.toml; this only puts ``llmlite-lm-eval.pth`` at the root of the wheel
(site-packages), which pyproject cannot express. It lets ``lm_eval --model llmlite`` find llmlite."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "llmlite-lm-eval.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
