"""The main job on the shipped tiny-shapes VLM: caption fresh shapes images and answer questions about them.

Draws N new images (from a seed the model never trained on), captions them, asks each its questions, prints every
answer beside the reference with the accuracy, and writes a PNG sheet. Then it captions one real photo, to show
honestly that the model knows shapes, not the world.

python pipelines/shapes_demo.py [--model DIR] [--n 6] [--seed 2026] [--out out/demo]
"""

import argparse
from pathlib import Path

from matplotlib.figure import Figure

from mmwb.data.shapes import make_example
from mmwb.pipelines.vlm import VLMPipeline, load_default_or
from mmwb.pipelines.vlm_eval import caption_scores, normalize, vqa_scores

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", help="a VLM folder (default: assets/models/tiny-shapes-vlm)")
parser.add_argument("--n", type=int, default=6, help="fresh images")
parser.add_argument(
    "--seed", type=int, default=2026, help="seed of the fresh images (the model trained on seed 0)"
)
parser.add_argument("--out", type=Path, default=Path("out/demo"))
args = parser.parse_args()

pipeline = VLMPipeline(load_default_or(args.model, device="cpu"), batch_size=16)
examples = [make_example(args.seed, "test", i) for i in range(args.n)]
images = [image for image, _ in examples]
captions = pipeline(images)
questions = [(i, qa) for i, (_, record) in enumerate(examples) for qa in record["qa"]]
answers = pipeline([images[i] for i, _ in questions], [qa["question"] for _, qa in questions])

sheet = Figure(figsize=(11, 2.2 * args.n))
for i, ((image, record), caption) in enumerate(zip(examples, captions, strict=True)):
    mark = "ok" if normalize(caption) == record["caption"] else "WRONG"
    print(f"\nimage {i}: {caption!r} [{mark}]\n  reference: {record['caption']!r}")
    lines = [f"caption: {caption}  [{mark}]", f"reference: {record['caption']}"]
    for (j, qa), answer in zip(questions, answers, strict=True):
        if j == i:
            mark = "ok" if normalize(answer) == qa["answer"] else f"WRONG, reference {qa['answer']!r}"
            print(f"  {qa['question']} -> {answer} [{mark}]")
            lines.append(f"{qa['question']} {answer}  [{mark}]")
    sheet.add_subplot(args.n, 2, 2 * i + 1).imshow(image)
    text = sheet.add_subplot(args.n, 2, 2 * i + 2)
    text.text(0, 0.5, "\n".join(lines), va="center", fontsize=8, family="monospace")
for axes in sheet.axes:
    axes.set_axis_off()
args.out.mkdir(parents=True, exist_ok=True)
sheet.savefig(args.out / "shapes_vlm.png", dpi=80, bbox_inches="tight")

exact = caption_scores(captions, [record["caption"] for _, record in examples])["caption_exact_match"]
vqa = vqa_scores(answers, [qa["answer"] for _, qa in questions], [qa["type"] for _, qa in questions])
print(f"\ncaption exact match {exact:.0%}, VQA accuracy {vqa['vqa_accuracy']:.0%} on {args.n} fresh images")
print(f"sheet: {args.out / 'shapes_vlm.png'}")
photo = Path("assets/images/chelsea.jpg")
print(f"\na real photo, {photo.name} (a cat; the model only knows shapes): {pipeline(photo)!r}")
