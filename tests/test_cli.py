"""The mmwb command: verbs listed, exit codes, one-line errors and --json output."""

import json
import os
import subprocess
import sys

import pytest

from mmwb.cli.main import VERBS, main


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mmwb.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_help_lists_every_design_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for verb in (
        "env",
        "caption",
        "ask",
        "generate",
        "sample",
        "likelihood",
        "train",
        "data",
        "recipe",
        "export",
        "bench",
    ):
        assert verb in VERBS and f"    {verb}" in out


def test_env_json_is_one_document_on_stdout():
    proc = run_cli("env", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["packages"]["torch"]
    assert {"name": "cpu", "dtypes": ["fp32", "bf16"]}.items() <= {**info["devices"][-1]}.items()
    assert info["threads"]["torch_intra_op"] >= 1


def test_env_human_output(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cpu" in out and "threads" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["env", "--device", "cuda:7"], "mmwb env: error: --device: device 'cuda:7' requested but"),
        (["env", "--dtype", "fp16", "--device", "cpu"], "fp16 is not supported on cpu"),
        (["data", "shapes", "--out", "x", "--n", "0"], "--n and --n-eval must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_the_traceback():
    proc = run_cli("env", "--debug", env={"MMWB_DEVICE": "tpu"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "MmwbDeviceError" in proc.stderr


def test_unknown_verb_and_bad_flag_are_usage_errors():
    for args in (["frobnicate"], ["env", "--seed", "x"]):
        proc = run_cli(*args)
        assert proc.returncode == 2 and "usage: mmwb" in proc.stderr
