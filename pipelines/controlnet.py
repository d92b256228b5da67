"""ControlNet-conditioned Stable Diffusion from Python: Canny edges of a sample image steer the picture.

    python pipelines/controlnet.py --model models/sd15 --controlnet models/sd15-canny --prompt "a watercolour town"

--model: a diffusers SD folder or one .safetensors file; --controlnet: a ControlNet folder or .safetensors file.
Without them the shipped tiny shapes model and its canny ControlNet draw (32x32, shapes only).
"""

import argparse
from pathlib import Path

from mmwb.models.diffusion.shapes_sd import DEFAULT_CONTROLNET, DEFAULT_MODEL
from mmwb.pipelines.controlnet import ControlNetGenerator, GenerationParams

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=DEFAULT_MODEL)
parser.add_argument("--controlnet", default=DEFAULT_CONTROLNET)
parser.add_argument(
    "--image", type=Path, default=None, help="control image (default: the first photo in assets/images)"
)
parser.add_argument("--prompt", default="a watercolour painting, soft light")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--device", default=None)
parser.add_argument("--out", type=Path, default=Path("out/controlnet"))
args = parser.parse_args()

image = args.image or sorted((Path(__file__).resolve().parents[1] / "assets" / "images").glob("*.jpg"))[0]
generator = ControlNetGenerator.from_pretrained(args.model, [args.controlnet], device=args.device)
params = GenerationParams(
    prompt=args.prompt, control_images=[str(image)], preprocess=["canny"], steps=args.steps
)
result = generator.generate(params)

args.out.mkdir(parents=True, exist_ok=True)
result.conditions[0].save(args.out / "condition.png")
result.images[0].save(args.out / "image.png")
print(
    f"{image} -> {args.out}/condition.png (canny) and {args.out}/image.png ({params.steps} steps, seed {params.seed})"
)
