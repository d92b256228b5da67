"""Caption images with mmwb's vision-language model (the shipped tiny-shapes model unless MODEL is given).

python pipelines/caption.py [MODEL_DIR]
"""

import sys
from pathlib import Path

from mmwb.pipelines.vlm import CaptionPipeline, load_default_or

model = load_default_or(sys.argv[1] if len(sys.argv) > 1 else None, device="cpu")
captioner = CaptionPipeline(model, batch_size=4)
images = sorted((Path(__file__).resolve().parents[1] / "assets" / "images").glob("*.jpg"))
for image, caption in zip(images, captioner(images, max_new_tokens=24), strict=True):
    print(f"{image.name}: {caption}")
