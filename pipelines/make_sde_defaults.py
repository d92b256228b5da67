"""Ship trained SDE models: copy a run's model folder to assets/models, measure it, write its MODEL_CARD.md.

    mmwb train sde --config configs/train/sde_checkerboard.yaml
    python pipelines/make_sde_defaults.py --run runs/sde-checkerboard --out assets/models/sde-checkerboard

The recorded metrics (config.json "info.metrics") are what tests/test_sde_cli.py checks the shipped model
against: heun at 24 steps (49 NFE) from seed 0 on a fixed number of samples, and the test-set likelihood.
"""

import argparse
import json
import shutil
from pathlib import Path

from mmwb.data.io import write_json
from mmwb.models.sde.trained import CONFIG_FILE, WEIGHTS_FILE, load_trained
from mmwb.pipelines.sde import generate, likelihood, quality, save_samples_figure
from mmwb.runtime import make_generator

STEPS = 24
SAMPLES = {True: 256, False: 2000}  # digits, 2-D

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run", type=Path, required=True, help="train.out_dir of the run")
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--config", type=Path, help="the YAML the run was trained from (for the card)")
parser.add_argument(
    "--likelihood-n", type=int, help="test items for the likelihood (default: all digits / 2000)"
)
args = parser.parse_args()

args.out.mkdir(parents=True, exist_ok=True)
for name in (CONFIG_FILE, WEIGHTS_FILE):
    shutil.copy2(args.run / "model" / name, args.out / name)
trained = load_trained(args.out)
is_image = trained.spec.data.is_image
n = SAMPLES[is_image]
samples, nfe = generate(trained, n, "heun", STEPS, make_generator(0), disable=True)
metrics = {"sampler": "heun", "steps": STEPS, "nfe": nfe, "n": n, "seed": 0, **quality(trained, samples)}
metrics["likelihood"] = likelihood(trained, args.likelihood_n, disable=True)
picture = save_samples_figure(
    trained, samples[:64] if is_image else samples, args.out / "samples.png", f"heun, {nfe} NFE"
)

config = json.loads((args.out / CONFIG_FILE).read_text())
config["info"]["metrics"] = metrics
write_json(args.out / CONFIG_FILE, config)
info = config["info"]
command = (
    f"mmwb train sde --config {args.config}" if args.config else "mmwb train sde --config <see info.train>"
)
quality_lines = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, float))
like = metrics["likelihood"]
like_line = (
    f"{like['bits_per_dim']:.4f} ± {like['bits_per_dim_sem']:.4f} bits/dim on {like['n']} test digits "
    f"(uniform dequantisation, Hutchinson, RK45 rtol=atol=1e-5, {like['nfe']} NFE)"
    if is_image
    else f"NLL {like['nll']:.4f} ± {like['nll_sem']:.4f} nats on {like['n']} test points (exact divergence, "
    f"{like['nfe']} NFE); the data's own NLL is {like.get('data_nll', float('nan')):.4f}"
)
limit = f" --likelihood-n {args.likelihood_n}" if args.likelihood_n else ""
# the spec keys that mean something for this model (config.json keeps them all)
sde_keys = (
    ("type", "sigma_min", "sigma_max", "N")
    if trained.spec.sde.type == "ve"
    else ("type", "beta_min", "beta_max", "N")
)
net_keys = (
    ("block_out_channels", "layers_per_block", "attention") if is_image else ("hidden", "depth", "embed_dim")
)
sde_text = json.dumps({k: config["sde"][k] for k in sde_keys})
net_text = json.dumps({k: config["network"][k] for k in (*net_keys, "embedding")})
card = f"""# {args.out.name}

A score-based SDE model (Song et al. 2021) trained by mmwb on {trained.spec.data.name}:
{trained.spec.sde.type.upper()} SDE ({sde_text}), network {net_text}.
`model.safetensors` holds the EMA weights (decay {info["train"]["ema_decay"]}); `config.json` describes the model.

## Reproduce

```
{command}
python pipelines/make_sde_defaults.py --run {args.run} --out {args.out}{f" --config {args.config}" if args.config else ""}{limit}
```

Seed {info["seed"]}, {info["steps"]} steps of batch {info["train"]["batch_size"]}, lr {info["train"]["lr"]}
({info["train"]["schedule"]}), trained in {info["train_seconds_this_run"]:.0f} s on a shared 2-core CPU.
Final training loss {info["last_loss"]:.4g}.

## Measured

Samples: heun, {STEPS} steps ({nfe} NFE), {n} samples from seed 0 (`samples.png`):

| metric | value |
|---|---|
{quality_lines}

Likelihood: {like_line}.

{"Fréchet distance in the 64-d features of assets/models/digits-classifier against the test split; confidence is its mean top softmax on the samples." if is_image else "Sliced Wasserstein-2 distance (512 projections) to 10 000 test points."}
`mmwb bench sde` gives every sampler's figures.

```
mmwb sample --model {args.out} --sampler pc --steps 1000 --n 64 --out samples.png
mmwb likelihood --model {args.out}
```
"""
(args.out / "MODEL_CARD.md").write_text(card, encoding="utf-8")
print(json.dumps(metrics, indent=2))
print(f"shipped {args.out} ({picture})")
