"""``mmwb bench align``: stage-1 training samples/s with the feature cache, without it, and in a plain loop over
transformers' ``LlavaForConditionalGeneration``, all on the same tiny random weights and shapes images.

The weights are made once as a transformers LLaVA (CLIP vision tower, Qwen3-MoE language model, ``mlp2x_gelu``
projector) and saved as transformers folders, which mmwb loads the way it loads any such checkpoint; so both sides
train the same projector on the same frozen tower and decoder. The reference loop is what a LLaVA user writes:
decode the batch's images, run ``CLIPImageProcessor``, call the model with ``labels`` on the caption tokens,
AdamW on the projector. Both sides' figures leave out step 1 (one-time costs); mmwb's come from the engine's own
samples/s. The cached run's one-time cache fill is timed on its own, and the cached rate is given twice: as
trained (the cache already full, as in every later run or epoch) and with the fill amortised over this run's
samples. Before timing, both sides compute the loss of the same first batch: the ratios compare like with like
only if those agree.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HELP = (
    "Time stage-1 alignment (projector training, tower and decoder frozen) with the feature cache, without it, "
    "and as a plain transformers LlavaForConditionalGeneration loop on the same tiny weights; prints samples/s "
    "and ratios. Goal: the cached run at least 3x the transformers loop."
)
TOWER = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 4}
TEXT = {
    "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 512,
}  # fmt: skip
LOSS_TOLERANCE = 1e-4  # fp32 on both sides; the same weights and inputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=256, help="shapes training images (default: 256)")
    parser.add_argument(
        "--size", type=int, default=64, help="image side; the tower takes 64 px (default: 64)"
    )
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per side (default: 12)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    parser.add_argument(
        "--work-dir", type=Path, help="where data, weights and cache go (default: a temp dir)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.bench.machine import describe_machine
    from mmwb.runtime import resolve_device

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        data, weights = make_inputs(work, args.images, args.size)
        report: dict[str, Any] = {"machine": describe_machine(device), "images": args.images}
        report["same_loss"] = compare_losses(data, weights, args.batch_size, device)
        report["mmwb_cached"] = time_mmwb(work / "cached", data, weights, args, cache=True)
        report["mmwb_uncached"] = time_mmwb(work / "uncached", data, weights, args, cache=False)
        report["transformers"] = time_llava(data, weights, args, device)
    cached = report["mmwb_cached"]
    samples = args.steps * args.batch_size
    cached["amortised_samples_per_s"] = samples / (cached["fill_s"] + samples / cached["samples_per_s"])
    rate = {name: report[name]["samples_per_s"] for name in ("mmwb_cached", "mmwb_uncached", "transformers")}
    amortised = cached["amortised_samples_per_s"]
    report["ratios"] = {
        "cached_vs_uncached": rate["mmwb_cached"] / rate["mmwb_uncached"],
        "cached_vs_transformers": rate["mmwb_cached"] / rate["transformers"],
        "uncached_vs_transformers": rate["mmwb_uncached"] / rate["transformers"],
        "amortised_vs_uncached": amortised / rate["mmwb_uncached"],
        "amortised_vs_transformers": amortised / rate["transformers"],
    }
    report["exit_code"] = 0 if report["same_loss"]["same"] else 1  # ratios of two different computations
    if not args.json:
        print(format_report(report))
    return report


def make_inputs(work: Path, images: int, size: int) -> tuple[Path, Path]:
    """Shapes data and the tiny LLaVA's weights as transformers folders (``vision``, ``text``, projector)."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeForCausalLM

    from mmwb.data.shapes import read_index, record_texts, write_dataset
    from mmwb.data.tokenizer import train_bpe_tokenizer
    from mmwb.runtime import seed_everything

    data, weights = work / "data", work / "weights"
    write_dataset(data, images, seed=0, size=size, n_eval=16, progress=False)
    tokenizer = train_bpe_tokenizer((t for r in read_index(data, "train") for t in record_texts(r)), 512)
    seed_everything(0)
    llava = make_llava(tokenizer)
    llava.model.vision_tower.save_pretrained(weights / "vision")
    text = Qwen3MoeForCausalLM(llava.config.text_config)
    text.model.load_state_dict(llava.model.language_model.state_dict())
    text.lm_head.load_state_dict(llava.lm_head.state_dict())
    text.save_pretrained(weights / "text")
    tokenizer.save_pretrained(weights / "text")
    projector = {k: v.contiguous() for k, v in llava.model.multi_modal_projector.state_dict().items()}
    save_file(projector, weights / "projector.safetensors")
    return data, weights


def make_llava(tokenizer: Any) -> Any:
    """A random tiny LLaVA whose image token and vocabulary are the tokenizer's."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen3MoeConfig

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=64, patch_size=8, **TOWER),
        text_config=Qwen3MoeConfig(vocab_size=len(tokenizer), **TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return LlavaForConditionalGeneration(config)


def mmwb_vlm(weights: Path) -> Any:
    """The same weights as an mmwb VLM: transformers CLIP tower, imported Qwen3-MoE decoder, mlp2x_gelu."""
    from safetensors.torch import load_file

    from mmwb.data.tokenizer import load_tokenizer
    from mmwb.models.decoder import load_decoder
    from mmwb.models.projectors import MLP2xGelu
    from mmwb.models.vision.hf import HFVisionTower
    from mmwb.train.vlm_setup import assemble

    tower = HFVisionTower.from_pretrained(weights / "vision", select_layer=-2)
    decoder = load_decoder(weights / "text")
    projector = MLP2xGelu(tower.hidden_size, decoder.config.hidden_size)
    projector.load_state_dict(load_file(weights / "projector.safetensors"))
    return assemble(tower, projector, decoder, load_tokenizer(weights / "text"))


def time_mmwb(
    out: Path, data: Path, weights: Path, args: argparse.Namespace, cache: bool
) -> dict[str, float]:
    """One engine run of ``mmwb.train.align``; samples/s is the engine's, over the run's steps. With the cache,
    it is filled first, as the trainer fills it, and timed on its own (``fill_s``); the run then finds it full."""
    from mmwb.data.captions import read_records
    from mmwb.runtime import resolve_device
    from mmwb.train import align
    from mmwb.train.config import TrainConfig
    from mmwb.train.image_features import FeatureCacheConfig, image_loader
    from mmwb.train.metrics import read_jsonl
    from mmwb.train.vlm_setup import freeze_all_but_projector, place

    feature_cache = FeatureCacheConfig(enabled=cache, root=out / "cache")
    config = align.AlignConfig(
        data_dir=data,
        val_file="val.jsonl",
        out_dir=out / "model",
        max_length=48,
        feature_cache=feature_cache,
        health=align.HealthConfig(max_items=16, retrieval_group=8),
        train=TrainConfig(
            out_dir=out / "run", max_steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=0,
            device=args.device, precision=args.dtype or "fp32", progress=False, tensorboard=False,
        ),
    )  # fmt: skip
    vlm = mmwb_vlm(weights)
    figures: dict[str, float] = {}
    if cache:
        paths = [data / r.image for r in read_records(data / "train.jsonl")]
        freeze_all_but_projector(vlm)  # the tower's dtype under mixed precision is part of the cache key
        place(vlm, resolve_device(args.device), args.dtype or "fp32")
        started = time.perf_counter()
        image_loader(vlm, feature_cache, paths, accelerator=None, progress=False)
        figures["fill_s"] = time.perf_counter() - started
        figures["filled_images"] = len(set(paths))
    started = time.perf_counter()
    result, _ = align.train_align(config, vlm)
    figures["samples_per_s"] = rate_after_first_step(read_jsonl(result.metrics), args.batch_size)
    figures["wall_s"] = time.perf_counter() - started
    return figures


def rate_after_first_step(records: list[dict[str, Any]], batch_size: int) -> float:
    """Samples/s over steps 2..N, from the engine's cumulative samples/s (step 1 pays one-time costs)."""
    first, last = records[0], records[-1]
    elapsed = last["step"] * batch_size / last["samples_per_s"] - batch_size / first["samples_per_s"]
    return (last["step"] - 1) * batch_size / elapsed


def load_llava(weights: Path, device: torch.device) -> tuple[Any, Any]:
    """transformers' LLaVA with the bench's weights, its tower and language model frozen; and the tokenizer."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel, Qwen3MoeForCausalLM

    from mmwb.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(weights / "text")
    llava = make_llava(tokenizer)
    llava.model.vision_tower.load_state_dict(CLIPVisionModel.from_pretrained(weights / "vision").state_dict())
    text = Qwen3MoeForCausalLM.from_pretrained(weights / "text")
    llava.model.language_model.load_state_dict(text.model.state_dict())
    llava.lm_head.load_state_dict(text.lm_head.state_dict())
    llava.model.multi_modal_projector.load_state_dict(load_file(weights / "projector.safetensors"))
    llava.requires_grad_(False)
    llava.model.multi_modal_projector.requires_grad_(True)
    return llava.to(device).train(), tokenizer


def llava_batcher(
    llava: Any, tokenizer: Any, data: Path, device: torch.device
) -> Callable[[list], dict[str, torch.Tensor]]:
    """``records -> batch``: what a LLaVA user feeds the model: CLIPImageProcessor pixels, the caption ids with
    the image token widened to the tower's 64 patch tokens, labels on the caption (plain format, mmwb's encoder).
    The processor and the encoder are made once, outside the timed loop, as a user's script would."""
    from transformers import CLIPImageProcessor

    from mmwb.data.io import load_image
    from mmwb.models.vlm.prompt import make_encoder
    from mmwb.train.multimodal import IGNORE_INDEX

    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    encode = make_encoder(tokenizer, "plain", 48)
    tokens, image_id = (64 // 8) ** 2, llava.config.image_token_index
    pad = torch.nn.utils.rnn.pad_sequence

    def batch(records: list) -> dict[str, torch.Tensor]:
        pixels = processor([load_image(data / r.image) for r in records], return_tensors="pt").pixel_values
        rows = [encode(r) for r in records]
        ids = [
            torch.cat([r["input_ids"][:1], torch.full((tokens,), image_id), r["input_ids"][2:]]) for r in rows
        ]
        labels = [
            torch.cat([r["labels"][:1], torch.full((tokens,), IGNORE_INDEX), r["labels"][2:]]) for r in rows
        ]
        return {
            "input_ids": pad(ids, batch_first=True, padding_value=tokenizer.pad_token_id).to(device),
            "attention_mask": pad([torch.ones(len(i)) for i in ids], batch_first=True).long().to(device),
            "pixel_values": pixels.to(device),
            "labels": pad(labels, batch_first=True, padding_value=IGNORE_INDEX).to(device),
        }

    return batch


def time_llava(data: Path, weights: Path, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """A plain training loop over ``LlavaForConditionalGeneration`` (frozen tower and LM), timed after step 1."""
    from mmwb.data.captions import read_records
    from mmwb.runtime import synchronize

    llava, tokenizer = load_llava(weights, device)
    make_batch = llava_batcher(llava, tokenizer, data, device)
    optimizer = torch.optim.AdamW(llava.model.multi_modal_projector.parameters(), lr=1e-3)
    records = read_records(data / "train.jsonl")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
    started, samples = 0.0, 0
    for step in range(args.steps):
        positions = range(step * args.batch_size, (step + 1) * args.batch_size)
        batch = [records[order[i % len(order)]] for i in positions]  # epochs repeat the one shuffled order
        out = llava(**make_batch(batch))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step == 0:
            started = time.perf_counter()
        else:
            samples += len(batch)
    return {"samples_per_s": samples / (time.perf_counter() - started)}


def compare_losses(data: Path, weights: Path, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Per-caption losses of the first batch, on mmwb's side as its trainer computes them (its own image
    processor and collation) and on transformers' from LLaVA's logits: the two sides must train the same thing."""
    import torch.nn.functional as F

    from mmwb.data.captions import read_records
    from mmwb.models.vlm.prompt import make_encoder
    from mmwb.train.image_features import ProcessedPixels
    from mmwb.train.multimodal import IGNORE_INDEX, collate
    from mmwb.train.vlm_loss import caption_losses

    records = read_records(data / "train.jsonl")[:batch_size]
    vlm = mmwb_vlm(weights).to(device).eval()
    encode, pixels = make_encoder(vlm.tokenizer, "plain", 48), ProcessedPixels(vlm.image_processor())
    items = [{**encode(r), **pixels(data / r.image)} for r in records]
    ours = caption_losses(vlm, collate(items, vlm.tokenizer.pad_token_id), with_images=True)
    llava, tokenizer = load_llava(weights, device)
    batch = llava_batcher(llava.eval(), tokenizer, data, device)(records)
    with torch.no_grad():
        logits = llava(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    targets = batch["labels"][:, 1:]  # (B, T - 1): each position's next token
    token_loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    theirs = token_loss.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)
    diff = float((ours.cpu() - theirs.cpu()).abs().max())
    return {"captions": len(records), "max_abs_diff": diff, "same": diff <= LOSS_TOLERANCE,
            "mmwb_mean": float(ours.mean()), "transformers_mean": float(theirs.mean())}  # fmt: skip


def format_report(report: dict[str, Any]) -> str:
    same = report["same_loss"]
    lines = [
        f"stage-1 alignment on {report['machine']['device']} ({report['machine']['cpu']})",
        f"  first batch, per-caption loss: max |mmwb - transformers| {same['max_abs_diff']:.2e} "
        f"({'same' if same['same'] else 'DIFFERENT: the ratios below do not compare like with like'})",
    ]
    for name in ("mmwb_cached", "mmwb_uncached", "transformers"):
        lines.append(f"  {name:<14} {report[name]['samples_per_s']:8.1f} samples/s")
    cached = report["mmwb_cached"]
    lines.append(f"  cache fill     {cached['fill_s']:8.2f} s for {cached['filled_images']} images; cached rate "
                 f"with the fill amortised over this run: {cached['amortised_samples_per_s']:.1f} samples/s")  # fmt: skip
    lines += [f"  {name}: {value:.2f}x" for name, value in report["ratios"].items()]
    return "\n".join(lines)
