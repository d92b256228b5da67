"""``mmwb bench vlm``: end-to-end captioning, mmwb's VLM against transformers' Kimi_K25ForConditionalGeneration.

A random Kimi-style model (MoonViT + pixel-shuffle projector + DeepSeek-V3 MoE text with MLA) is built in
transformers, its in-memory tensors written to safetensors and imported with ``mmwb.from_pretrained``, so both hold
identical weights. One caption = image preprocessing + tower + projector + prefill + greedy decode of
``--new-tokens`` tokens, timed on both sides alternately (median over repeats after a warm-up); the greedy tokens
are compared as a sanity check. The packing check runs the tower on a batch of mixed sizes and counts the tokens
it computes against what padding every image to the largest would cost.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

HELP = "Time end-to-end captioning of mmwb's VLM against transformers' Kimi-K2.5 on the same random weights."
IMAGE_ID = 7
SIZES: dict[str, dict[str, int]] = {
    "bench-small": {"vocab": 8000, "hidden": 512, "layers": 4, "experts": 16, "vit": 256, "vit_layers": 4},
    "tiny": {"vocab": 256, "hidden": 64, "layers": 2, "experts": 4, "vit": 32, "vit_layers": 1},
}
IMAGE_SIZES = [(224, 168), (112, 280), (168, 168), (56, 392)]  # (width, height): mixed, non-square, x 28


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=list(SIZES), default="bench-small", help="model shape")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (default: 3)")
    parser.add_argument("--new-tokens", type=int, default=32, help="caption length in tokens (default: 32)")
    parser.add_argument("--batch", type=int, default=1, help="images per caption call (default: 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's); 1 avoids "
        "stalls when other jobs hold the cores",
    )  # fmt: skip


def reference_model(size: str, seed: int) -> Any:
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    s = SIZES[size]
    text = dict(
        model_type="deepseek_v3", vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=2 * s["hidden"],
        moe_intermediate_size=s["hidden"] // 2, num_hidden_layers=s["layers"], first_k_dense_replace=1,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=s["experts"], num_experts_per_tok=2,
        n_shared_experts=1, n_group=1, topk_group=1, max_position_embeddings=2048,
    )  # fmt: skip
    vision = dict(
        patch_size=14, pos_emb_height=16, pos_emb_width=16, num_attention_heads=4, num_hidden_layers=s["vit_layers"],
        hidden_size=s["vit"], intermediate_size=2 * s["vit"],
    )  # fmt: skip
    config = Kimi_K25Config(
        text_config=text, vision_config=vision, projection_hidden_size=s["vit"], tie_word_embeddings=False,
        image_token_id=IMAGE_ID,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Kimi_K25ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # random weights: always decode the full length
    return model


def load_pair(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[Any, Any]:
    """(mmwb VLM, transformers model) with identical weights (transformers' in-memory names, read by mmwb)."""
    from safetensors.torch import save_file

    import mmwb

    reference = reference_model(size, seed)
    with tempfile.TemporaryDirectory(prefix="mmwb-bench-vlm-") as folder:
        reference.config.save_pretrained(folder)
        state = {k: v.detach().contiguous() for k, v in reference.state_dict().items()}
        save_file(state, Path(folder) / "model.safetensors", metadata={"format": "pt"})
        ours = mmwb.from_pretrained(folder, device=device, dtype=dtype)
    return ours, reference.to(device=device, dtype=dtype)


def test_images(count: int, seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    sizes = [IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(count)]
    return [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
        for w, h in sizes
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import Kimi_K25ImageProcessor

    from mmwb.bench.decoder import fastest_experts_implementation, paired_medians
    from mmwb.bench.machine import describe_machine
    from mmwb.runtime import resolve_device, resolve_precision

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_precision(args.dtype, device).param_dtype
    seed = 0 if args.seed is None else args.seed
    ours, reference = load_pair(args.size, device, dtype, seed)
    images = test_images(args.batch, seed)
    processor = Kimi_K25ImageProcessor(patch_size=14, merge_size=2)
    short = torch.tensor([[1, 2, IMAGE_ID, 3, 4]] * args.batch)  # one <image> per image: mmwb widens it
    gen = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": 0}

    def ours_call() -> torch.Tensor:
        with torch.inference_mode():
            return ours.generate(short.to(device), images=images, new_tokens_only=True, **gen)

    def theirs_inputs() -> dict[str, torch.Tensor]:
        """What Kimi's processor hands the model: patches, grids and prompts widened and left-padded."""
        pixels = processor(images, return_tensors="pt")
        grid = pixels["image_grid_thw"]
        rows = [[1, 2] + [IMAGE_ID] * n + [3, 4] for n in (grid[:, 1] * grid[:, 2] // 4).tolist()]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        return {
            "input_ids": ids.to(device),
            "attention_mask": (ids != 0).long().to(device),
            "pixel_values": pixels["pixel_values"].to(device, dtype),
            "image_grid_thw": grid.to(device),
        }

    def theirs_call() -> torch.Tensor:
        with torch.inference_mode():
            inputs = theirs_inputs()
            return reference.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1] :]

    experts = fastest_experts_implementation(reference, theirs_call, device)
    same_tokens = torch.equal(ours_call().cpu(), theirs_call().cpu())
    with torch.inference_mode():
        inputs = theirs_inputs()
        real = inputs["attention_mask"].bool()
        diff = (ours(**inputs).logits[real] - reference(**inputs).logits[real]).abs().max().item()
    seconds = paired_medians({"mmwb": ours_call, "transformers": theirs_call}, device, args.repeats)
    tokens = args.batch * args.new_tokens
    report = {
        "machine": describe_machine(device),
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "transformers_experts": experts,
        "greedy_tokens_identical": same_tokens,
        "logits_max_abs_diff": diff,
        "latency_s": seconds,
        "tokens_per_s": {name: tokens / s for name, s in seconds.items()},
        "speedup": seconds["transformers"] / seconds["mmwb"],
        "packing": packing_check(ours, seed),
    }
    if not args.json:
        print(format_report(report))
    return report


def packing_check(model: Any, seed: int) -> dict[str, Any]:
    """Tokens the tower computes for a mixed-size batch vs padding all images to the largest grid."""
    images = test_images(len(IMAGE_SIZES), seed)
    pixels = model.process_images(images)
    features = model.encode_images(pixels)
    counts = [h * w for h, w in pixels.grid_hw.tolist()]
    padded = len(counts) * max(counts)
    return {
        "patches_per_image": counts,
        "tower_tokens_computed": int(features.features.shape[0]),
        "tokens_if_padded": padded,
        "padding_compute": int(features.features.shape[0]) - sum(counts),
    }


def format_report(report: dict[str, Any]) -> str:
    m, lat, tps, pack = report["machine"], report["latency_s"], report["tokens_per_s"], report["packing"]
    return "\n".join([
        f"mmwb bench vlm: {report['size']} Kimi-style weights, {report['dtype']}, batch {report['batch']}, "
        f"{report['new_tokens']} new tokens, {m.get('cpu')} ({m.get('usable_cpus')} CPUs)",
        f"  caption latency    mmwb {lat['mmwb']:.3f} s   transformers {lat['transformers']:.3f} s   "
        f"speedup x{report['speedup']:.2f}",
        f"  tokens/s           mmwb {tps['mmwb']:.1f}   transformers {tps['transformers']:.1f}",
        f"  greedy tokens identical: {report['greedy_tokens_identical']}, logits max |diff| "
        f"{report['logits_max_abs_diff']:.1e} "
        f"(transformers experts: {report['transformers_experts']})",
        f"  packing: {pack['tower_tokens_computed']} tower tokens for patches {pack['patches_per_image']} "
        f"(padding compute {pack['padding_compute']}; padded batch would be {pack['tokens_if_padded']})",
    ])  # fmt: skip
