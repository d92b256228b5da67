"""Ask a vision-language model a question about an image (the shipped tiny-shapes model unless MODEL is given).

python pipelines/ask.py [MODEL_DIR]
"""

import sys
from pathlib import Path

from mmwb.pipelines.vlm import VQAPipeline, load_default_or

model = load_default_or(sys.argv[1] if len(sys.argv) > 1 else None, device="cpu")
vqa = VQAPipeline(model)
rocket = Path(__file__).resolve().parents[1] / "assets" / "images" / "rocket.jpg"
for question in ("what colour is the circle?", "how many shapes are there?"):
    print(question, "->", vqa(rocket, prompt=question, max_new_tokens=16))
