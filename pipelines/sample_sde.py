"""Sample a shipped score-based SDE model and save the picture (copy this to start your own script).

python pipelines/sample_sde.py                       # checkerboard, 25-step Heun
python pipelines/sample_sde.py --model assets/models/sde-digits --sampler pc --steps 500
"""

import argparse
from pathlib import Path

from mmwb.pipelines.sde import DEFAULT_MODEL, generate, load_trained, quality, save_samples_figure
from mmwb.runtime import make_generator, resolve_device

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
parser.add_argument("--sampler", default="heun")
parser.add_argument("--steps", type=int, default=25)
parser.add_argument("--n", type=int, default=1000)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default=None)
parser.add_argument("--out", type=Path, default=Path("out/sde/sample.png"))
args = parser.parse_args()

device = resolve_device(args.device)
trained = load_trained(args.model, device)
samples, nfe = generate(trained, args.n, args.sampler, args.steps, make_generator(args.seed, device))
save_samples_figure(trained, samples, args.out, f"{args.sampler}, {nfe} NFE")
print(f"{args.n} samples ({nfe} NFE) -> {args.out}; quality: {quality(trained, samples, args.seed)}")
