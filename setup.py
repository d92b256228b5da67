"""Packaging hook: a wheel carries the shipped models, sample images and configs inside the package
(``mmwb/_shipped/``), where ``mmwb.runtime.resources`` finds them once mmwb is installed without its checkout.
Everything else about the package is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("assets/models", "assets/images", "configs")  # relative to the checkout and to mmwb/_shipped
LEFT_OUT = shutil.ignore_patterns("*.py", "__pycache__", ".*")  # assets/images/make_assets.py is a dev tool


class BuildPyWithShipped(build_py):
    """``build_py`` that also copies the shipped files; an editable install reads them from the checkout."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for relative in SHIPPED:
            target = Path(self.build_lib) / "mmwb" / "_shipped" / relative
            shutil.rmtree(target, ignore_errors=True)  # no stale files from an earlier build
            shutil.copytree(relative, target, ignore=LEFT_OUT)


setup(cmdclass={"build_py": BuildPyWithShipped})
