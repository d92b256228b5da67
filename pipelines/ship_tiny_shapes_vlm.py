"""Ship the tiny-shapes recipe's model as mmwb's default VLM (assets/models/tiny-shapes-vlm).

    mmwb recipe tiny-shapes --out runs/tiny-shapes
    python pipelines/ship_tiny_shapes_vlm.py --recipe runs/tiny-shapes

Copies the last stage's model (config, weights, tokenizer) and writes ``metrics.json``: every stage's metrics as the
recipe measured them, and the scores on a fixed sample (the first N test images of the data seed, drawn afresh)
that ``tests/test_shipped_vlm.py`` checks the shipped model still reaches.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from mmwb.data.shapes import write_dataset
from mmwb.pipelines.vlm import DEFAULT_MODEL, load_default_or
from mmwb.pipelines.vlm_eval import EvaluationConfig, evaluate_vlm
from mmwb.train.recipes import RECIPES

SHIPPED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--recipe", type=Path, default=Path("runs/tiny-shapes"), help="the recipe's --out folder")
parser.add_argument("--out", type=Path, default=DEFAULT_MODEL)
parser.add_argument("--sample", type=int, default=100, help="test images of the fixed sample")
args = parser.parse_args()

args.out.mkdir(parents=True, exist_ok=True)
shipped_stages = [s for s in RECIPES["tiny-shapes"] if not s.optional]  # the default model's, not stage3_dpo
final = shipped_stages[-1].name
for name in SHIPPED:
    shutil.copy2(args.recipe / final / name, args.out / name)
stages = {s.name: json.loads((args.recipe / s.name / "metrics.json").read_text()) for s in shipped_stages}
data = json.loads((args.recipe / "data" / "meta.json").read_text())
with tempfile.TemporaryDirectory() as tmp:
    write_dataset(Path(tmp), 0, seed=data["seed"], size=data["size"], n_eval=args.sample, progress=False)
    config = EvaluationConfig(max_items=args.sample)
    sample, _ = evaluate_vlm(load_default_or(args.out, device="cpu"), Path(tmp), config, progress=False)
sample |= {"seed": data["seed"], "size": data["size"], "images": args.sample}
(args.out / "metrics.json").write_text(
    json.dumps({"stages": stages, "fixed_sample": sample}, indent=2) + "\n"
)
print(json.dumps(sample, indent=2))
