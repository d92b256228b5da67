"""The shared runtime in a few lines: pick a device, load sample images, time fp32 vs bf16, save a labelled grid.

python pipelines/runtime_demo.py --out out/demo
"""

import argparse
from pathlib import Path

import torch

from mmwb.data.io import expand_image_sources, load_image, save_image_grid
from mmwb.data.shapes import make_example
from mmwb.runtime import Timer, make_generator, resolve_device, resolve_precision, track_peak_memory

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", type=Path, default=Path("out/demo"))
parser.add_argument("--device", default=None)
args = parser.parse_args()

device = resolve_device(args.device)
photos = [load_image(path) for path in expand_image_sources(["assets/images"])]
shapes = [make_example(seed=0, split="test", index=i, size=128) for i in range(4)]
images = photos + [image for image, _ in shapes]
labels = [f"{p.width}x{p.height} photo" for p in photos] + [record["caption"] for _, record in shapes]
grid = save_image_grid(images, args.out / "runtime_demo.png", labels=labels, ncols=4)
print(f"device {device}: loaded {len(photos)} photos and drew {len(shapes)} shapes -> {grid}")

a = torch.randn(1024, 1024, device=device, generator=make_generator(0, device))
for name in ("fp32", "bf16"):
    precision = resolve_precision(name, device)
    with precision.autocast(), Timer(device) as timer, track_peak_memory(device) as memory:
        for _ in range(10):
            b = a @ a
    gflops = 10 * 2 * 1024**3 / timer.seconds / 1e9
    print(
        f"{name}: 10 matmuls 1024^2 in {timer.seconds * 1e3:.1f} ms ({gflops:.1f} GFLOP/s), "
        f"result {b.dtype}, peak +{memory.added_bytes / 2**20:.1f} MiB"
    )
