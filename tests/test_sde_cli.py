"""mmwb train sde / sample / likelihood / bench sde: round trips, exact resume, shipped models, one-line errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmwb.cli.main import main
from mmwb.errors import MmwbCheckpointError
from mmwb.models.sde.trained import load_trained
from mmwb.pipelines.sde import (
    DEFAULT_MODEL,
    DIGITS_CLASSIFIER,
    DIGITS_MODEL,
    EIGHT_GAUSSIANS_MODEL,
    generate,
    likelihood,
    quality,
)
from mmwb.runtime import make_generator

TOY = """
data: {name: checkerboard, n_train: 256}
network: {hidden: 16, depth: 1, embed_dim: 8}
eval: {samples: 32, steps: 2}
train: {max_steps: 4, batch_size: 32, lr: 1.0e-3, ema_decay: 0.9, save_every: 2, progress: false}
"""
DIGITS = """
data: {name: digits}
network: {block_out_channels: [4, 8], attention: false}
eval: {samples: 0}
train: {max_steps: 2, batch_size: 8, ema_decay: 0.9, progress: false}
"""


def cli_json(capsys, *args):
    code = main([*map(str, args), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def train_cli(capsys, tmp_path, text, out, *extra):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    return cli_json(capsys, "train", "sde", "--config", config, f"train.out_dir={out}", *extra)


@pytest.mark.slow
def test_toy_round_trip_train_sample_likelihood(capsys, tmp_path):
    trained = train_cli(capsys, tmp_path, TOY, tmp_path / "run")
    model = tmp_path / "run" / "model"
    assert trained["model"] == str(model) and trained["step"] == 4
    assert set(trained["final_eval"]) >= {"eval_sliced_wasserstein", "ema_eval_sliced_wasserstein"}
    assert json.loads((model / "config.json").read_text())["info"]["steps"] == 4
    # the final folder holds the EMA weights of the last checkpoint, under the model's own names
    ema = load_file(tmp_path / "run" / "checkpoints" / "step-00000004" / "ema.safetensors")
    final = load_file(model / "model.safetensors")
    assert final.keys() == {k.removeprefix("module.") for k in ema if k != "n_averaged"}
    assert all(torch.equal(final[k], ema[f"module.{k}"]) for k in final)

    png = tmp_path / "samples.png"
    sampled = cli_json(
        capsys, "sample", "--model", model, "--sampler", "heun", "--steps", 3, "--n", 16, "--out", png
    )
    assert sampled["nfe"] == 7 and png.stat().st_size > 1000
    again = cli_json(
        capsys,
        "sample",
        "--model",
        model,
        "--sampler",
        "pc",
        "--steps",
        5,
        "--n",
        8,
        "--out",
        png,
        "--quality",
    )
    assert again["nfe"] == 11 and again["quality"]["sliced_wasserstein"] > 0
    nll = cli_json(capsys, "likelihood", "--model", model, "--n", 16, "--rtol", 1e-3, "--atol", 1e-3)
    assert nll["exact_divergence"] and nll["n"] == 16 and nll["nfe"] > 0
    assert nll["data_nll"] == pytest.approx(3.4657, abs=1e-3)  # log 32: uniform on 8 squares of area 4
    assert torch.isfinite(torch.tensor(nll["nll"]))


@pytest.mark.slow
def test_digits_round_trip_and_bits_per_dim(capsys, tmp_path):
    train_cli(capsys, tmp_path, DIGITS, tmp_path / "run")
    model = tmp_path / "run" / "model"
    png = tmp_path / "grid.png"
    sampled = cli_json(
        capsys, "sample", "--model", model, "--sampler", "ancestral", "--steps", 2, "--n", 4, "--out", png
    )
    assert sampled["nfe"] == 3 and png.is_file()
    bpd = cli_json(capsys, "likelihood", "--model", model, "--n", 1, "--rtol", 0.1, "--atol", 0.1)
    assert not bpd["exact_divergence"] and bpd["bits_per_dim"] > 0


@pytest.mark.slow
def test_resume_through_the_cli_continues_exactly(capsys, tmp_path):
    """A run resumed from its step-2 checkpoint ends with the same weights as the run that never stopped."""
    train_cli(capsys, tmp_path, TOY, tmp_path / "a")
    uninterrupted = load_file(tmp_path / "a" / "model" / "model.safetensors")
    shutil.copytree(
        tmp_path / "a" / "checkpoints" / "step-00000002", tmp_path / "b" / "checkpoints" / "step-00000002"
    )
    resumed = train_cli(capsys, tmp_path, TOY, tmp_path / "b", "--resume")  # as if killed after step 2
    assert resumed["step"] == 4
    final = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)


def test_checkpoint_folders_load_as_models(capsys, tmp_path):
    train_cli(capsys, tmp_path, TOY, tmp_path / "run", "train.max_steps=2")
    trained = load_trained(tmp_path / "run" / "checkpoints" / "step-00000002")
    assert trained.spec.data.name == "checkerboard" and not trained.model.training


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sample", "--sampler", "bogus"], "unknown sampler 'bogus'"),
        (["sample", "--model", "/nonexistent/model"], "/nonexistent/model: no such model folder"),
        (["likelihood", "--model", "/nonexistent/model"], "/nonexistent/model: no such model folder"),
        (["sample", "--n", "0"], "--n must be >= 1"),
        (["sample", "--dtype", "bf16"], "fp32 only"),
        (["sample", "--schedule", "cubic"], "unknown schedule 'cubic'"),
        (["sample", "--label", "3"], "--label needs a digits model; this one was trained on checkerboard"),
        (["sample", "--sampler", "heun", "--snr", "0.1"], "sampler 'heun' has no corrector"),
        (["sample", "--guidance-scale", "3"], "--guidance-scale guide --label; give the class"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, args, message):
    assert main([*args, "--out", str(tmp_path / "x.png")] if args[0] == "sample" else args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_label_outside_the_ten_classes_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(DIGITS_MODEL), "--label", "12"])
    assert "'12' is not a digit class" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_draws_the_asked_digits(capsys, tmp_path):
    args = ["--model", DIGITS_MODEL, "--sampler", "heun", "--steps", 24, "--n", 50, "--quality"]
    guided = cli_json(capsys, "sample", *args, "--label", "all", "--out", tmp_path / "all.png")
    assert guided["label"] == "all" and guided["guidance_scale"] == 2.0
    assert guided["quality"]["accuracy"] >= 0.85 and (tmp_path / "all.png").is_file()
    sevens = cli_json(capsys, "sample", *args, "--label", 7, "--out", tmp_path / "7.png")
    assert sevens["quality"]["accuracy"] >= 0.85
    unguided = cli_json(
        capsys, "sample", *args, "--label", 7, "--guidance-scale", 0, "--out", tmp_path / "u.png"
    )
    assert unguided["quality"]["accuracy"] < 0.4  # the unconditional model draws a 7 about one time in ten


def test_a_folder_that_is_no_model_names_itself(tmp_path):
    with pytest.raises(MmwbCheckpointError, match="no config.json"):
        load_trained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "mmwb-sde", "data": {"nmae": "x"}}))
    with pytest.raises(MmwbCheckpointError, match="did you mean 'data.name'"):
        load_trained(tmp_path)


def _recorded(folder):
    return json.loads((folder / "config.json").read_text())["info"]["metrics"]


@pytest.mark.slow
def test_shipped_checkerboard_reaches_its_recorded_quality():
    trained = load_trained(DEFAULT_MODEL)
    recorded = _recorded(DEFAULT_MODEL)
    samples, nfe = generate(
        trained, recorded["n"], "heun", recorded["steps"], make_generator(0), disable=True
    )
    assert nfe == recorded["nfe"]
    assert quality(trained, samples)["sliced_wasserstein"] <= 1.1 * recorded["sliced_wasserstein"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampler, options",
    [
        ("heun", {"steps": 24}),
        ("euler_maruyama", {"steps": 200}),
        ("reverse_diffusion", {"steps": 200}),
        ("ancestral", {"steps": 200}),
        ("pc", {"steps": 200}),
        ("ode", {"rtol": 1e-3, "atol": 1e-3}),
        ("ode_torch", {"rtol": 1e-3, "atol": 1e-3}),
    ],
)
def test_every_sampler_matches_the_exact_8_gaussians_density(sampler, options):
    # the samples' NLL under the true mixture lands near the data's own (its entropy, 2.84 nats): too spread
    # is higher, collapsed onto the centres is lower
    trained = load_trained(EIGHT_GAUSSIANS_MODEL)
    samples, _ = generate(trained, 1000, sampler, generator=make_generator(0), disable=True, **options)
    measured = quality(trained, samples)
    data_nll = _recorded(EIGHT_GAUSSIANS_MODEL)["likelihood"]["data_nll"]
    assert measured["sample_nll"] == pytest.approx(data_nll, abs=0.2)
    assert measured["sliced_wasserstein"] < 0.3  # 1000 real points score 0.05-0.23 (mixture weights vary)


@pytest.mark.slow
def test_shipped_8_gaussians_likelihood_is_near_the_data_entropy():
    recorded = _recorded(EIGHT_GAUSSIANS_MODEL)["likelihood"]
    measured = likelihood(load_trained(EIGHT_GAUSSIANS_MODEL), 500, disable=True)  # exact divergence
    assert measured["exact_divergence"] and measured["nll"] == pytest.approx(recorded["nll"], abs=0.1)
    assert measured["nll"] - measured["data_nll"] < 0.15  # the model's density is close to the true one


@pytest.mark.slow
def test_shipped_digits_bits_per_dim_match_the_card():
    recorded = _recorded(DIGITS_MODEL)["likelihood"]  # 2.117 +- 0.020 on 180 test digits, rtol 1e-5
    measured = likelihood(load_trained(DIGITS_MODEL), 24, rtol=1e-3, atol=1e-3, disable=True)
    assert measured["bits_per_dim"] == pytest.approx(
        recorded["bits_per_dim"], abs=0.25
    )  # 24 digits: sem ~0.06


@pytest.mark.slow
def test_shipped_digits_model_reaches_its_recorded_quality():
    trained = load_trained(DIGITS_MODEL)
    recorded = _recorded(DIGITS_MODEL)
    samples, _ = generate(trained, recorded["n"], "heun", recorded["steps"], make_generator(0), disable=True)
    measured = quality(trained, samples)
    assert measured["fd"] <= 1.1 * recorded["fd"]
    assert measured["confidence"] >= recorded["confidence"] - 0.03


def test_shipped_classifier_is_accurate_on_the_test_split():
    from mmwb.models.sde.digit_metrics import load_classifier
    from mmwb.train.digit_classifier import test_accuracy

    assert test_accuracy(load_classifier(DIGITS_CLASSIFIER)) >= 0.97


@pytest.mark.slow
def test_bench_reports_ratios_to_the_reference(capsys, tmp_path):
    report = cli_json(
        capsys,
        "bench",
        "sde",
        "--models",
        "checkerboard",
        "--samplers",
        "heun",
        "--n-2d",
        300,
        "--out",
        tmp_path,
    )
    result = report["models"]["checkerboard"]
    assert result["reference"]["nfe"] == 2001 and len(result["rows"]) == 4
    assert result["goal"]["nfe"] == 49 and (tmp_path / "quality_vs_nfe_checkerboard.png").is_file()
