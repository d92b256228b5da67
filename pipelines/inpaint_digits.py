"""Inpaint test digits with the shipped digits score model: keep the top rows, sample the rest (copy this to start).

python pipelines/inpaint_digits.py                 # 20 test digits, bottom half generated, PC sampler
python pipelines/inpaint_digits.py --keep-rows 2 --sampler euler_maruyama --steps 500

The unconditional model fills the masked rows by replacement (Song et al. 2021, app. I): after each step the kept
pixels are reset to the data noised to the current time. The picture shows the originals, what the sampler was
given and its completions; the shipped digit classifier then reads the completions against the true labels.
"""

import argparse
from pathlib import Path

import torch

from mmwb.data.digits import load_digits_tensors
from mmwb.models.sde import inpaint
from mmwb.models.sde.data import to_unit_images
from mmwb.models.sde.digit_metrics import load_classifier
from mmwb.models.sde.plots import image_grid
from mmwb.pipelines.sde import DIGITS_CLASSIFIER, DIGITS_MODEL, load_trained
from mmwb.runtime import make_generator, resolve_device

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", type=Path, default=DIGITS_MODEL)
parser.add_argument("--n", type=int, default=20, help="test digits to complete")
parser.add_argument("--keep-rows", type=int, default=4, help="top rows of the 8 kept (default: 4)")
parser.add_argument("--sampler", default="pc")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default=None)
parser.add_argument("--out", type=Path, default=Path("out/sde/inpaint_digits.png"))
args = parser.parse_args()

device = resolve_device(args.device)
trained = load_trained(args.model, device)
spec = trained.spec.data
test = load_digits_tensors("test", spec.size, spec.resize, "symmetric")
digits, labels = test.images[: args.n].to(device), test.labels[: args.n]  # (N, 1, S, S) in [-1, 1]
mask = torch.zeros_like(digits[:1])  # (1, 1, S, S): 1 keeps a pixel
mask[..., : args.keep_rows * spec.size // 8, :] = 1
done, nfe = inpaint(
    trained.sde, trained.model, digits, mask, args.sampler, args.steps, make_generator(args.seed, device)
)
given = digits * mask - (1 - mask)  # the rows left to generate shown as background
unit = [to_unit_images(spec, x.cpu()) for x in (digits, given, done)]
image_grid(torch.cat(unit), args.out, f"originals / given / completed ({args.sampler}, {nfe} NFE)", args.n)
classifier = load_classifier(DIGITS_CLASSIFIER)
read = [float((classifier(x).argmax(-1) == labels).float().mean()) for x in unit]
print(f"{args.n} digits, top {args.keep_rows} of 8 rows kept, {nfe} NFE -> {args.out}")
print(
    f"digit classifier accuracy: originals {read[0]:.2f}, given half {read[1]:.2f}, completed {read[2]:.2f}"
)
