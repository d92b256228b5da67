"""mmwb installed from its wheel, away from the checkout: the shipped models and configs come along.

The wheel is built from a copy of the source files (no stale ``build/`` of the checkout can leak in) and installed
without dependencies into a fresh venv whose only view of torch & co. is a ``.pth`` line naming this venv's
site-packages; that line does not run this venv's ``.pth`` files, so the checkout's editable install stays out.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from mmwb.cli.main import VERBS
from mmwb.data.shapes import make_example
from mmwb.pipelines.vlm import VLMPipeline, load_default_or

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "mmwb", "assets", "configs")
MAX_WHEEL_MB = 30  # what it weighs is printed; PyPI's default limit is 100 MB

pytestmark = pytest.mark.slow


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMWB_HOME")}
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh venv's bin folder, the built wheel)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", work / "dist", src, cwd=work)  # fmt: skip
    (wheel,) = (work / "dist").glob("mmwb-*.whl")
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=work)
    python = venv / "bin" / "python"
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=work)
                   .stdout.strip())  # fmt: skip
    (purelib / "mmwb_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel,
         cwd=work)  # fmt: skip
    return venv / "bin", wheel


def test_wheel_carries_the_shipped_files_and_stays_small(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "mmwb/_shipped/assets/models/tiny-shapes-vlm/config.json",
        "mmwb/_shipped/assets/models/sde-digits/config.json",
        "mmwb/_shipped/assets/models/shapes-sd/model_index.json",
        "mmwb/_shipped/configs/recipes/tiny-shapes/data.yaml",
        "mmwb/_shipped/assets/images/chelsea.jpg",
        "mmwb/models/decoder/kernels/cpu.c",
    ):
        assert expected in names, expected
    assert not any(name.endswith("make_assets.py") for name in names)
    megabytes = wheel.stat().st_size / 2**20
    print(f"{wheel.name}: {megabytes:.1f} MB, {len(names)} files")
    assert megabytes <= MAX_WHEEL_MB


def test_installed_mmwb_captions_with_its_default_model(installed, tmp_path):
    bin_dir, _ = installed
    image = tmp_path / "scene.png"
    make_example(0, "test", 0)[0].save(image)
    where = _run(bin_dir / "python", "-c", "import mmwb; print(mmwb.__file__)", cwd=tmp_path).stdout
    assert Path(where.strip()).is_relative_to(bin_dir.parent)  # the wheel's mmwb, not the checkout's
    out = json.loads(_run(bin_dir / "mmwb", "caption", image, "--json", cwd=tmp_path).stdout)
    assert Path(out["model"]).is_relative_to(bin_dir.parent) and out["model"].endswith("tiny-shapes-vlm")
    (expected,) = VLMPipeline(load_default_or(None, device="cpu")).run([str(image)])
    assert out["results"][0]["text"] == expected.text and expected.text


def test_installed_mmwb_help_for_every_verb_and_the_recipe(installed, tmp_path):
    bin_dir, _ = installed
    assert "recipe" in _run(bin_dir / "mmwb", "--help", cwd=tmp_path).stdout
    code = (
        "from mmwb.cli.main import main\n"
        f"for verb in {sorted(VERBS)!r}:\n"
        "    try:\n        main([verb, '--help'])\n"
        "    except SystemExit as stop:\n        assert stop.code == 0, verb\n"
    )
    helps = _run(bin_dir / "python", "-c", code, cwd=tmp_path).stdout
    assert helps.count("usage: mmwb") == len(VERBS)
    recipe = _run(bin_dir / "mmwb", "recipe", "tiny-shapes", "--help", cwd=tmp_path).stdout
    assert "usage: mmwb recipe" in recipe
    # its data step reads the installed configs/recipes/tiny-shapes/data.yaml
    report = _run(bin_dir / "mmwb", "recipe", "tiny-shapes", "--quick", "--stages", "0", "--out", "run", "--json",
                  cwd=tmp_path).stdout  # fmt: skip
    assert json.loads(report)["stages"] == {} and (tmp_path / "run" / "data").is_dir()
