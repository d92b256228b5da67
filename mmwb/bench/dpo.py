"""``mmwb bench dpo``: peak memory of a DPO step with LoRA against an instruction-tuning step with LoRA on the same
model and the same number of sequences, each in a fresh process.

DPO needs a reference model; mmwb's is the policy with its adapters switched off, so a DPO step should cost about
what an instruct step costs (the goal: at most 1.2x the instruct step's peak RSS). The model is a random VLM with
the shipped model's tower and tokenizer and a decoder large enough (about 230 M parameters, 0.9 GB in fp32) that a
second copy of it as the reference would show: what a copy would add is printed beside the ratio. Both workers
train on the same sequences (the P pairs' chosen and rejected captions: DPO as pairs, instruct as 2P plain targets),
run a few optimizer steps (forward, backward, AdamW on the LoRA factors) and report their peak resident memory
(``ru_maxrss``) and the resident memory after loading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HELP = (
    "Peak RSS of a DPO step with LoRA (reference = adapters off) vs an instruct step with LoRA on the same ~230 M "
    "parameter VLM and the same sequences, each in a fresh process. Goal: at most 1.2x."
)
DECODER = {"hidden_size": 1536, "num_layers": 8, "num_heads": 12, "num_kv_heads": 12, "head_dim": 128,
           "intermediate_size": 4096, "max_position_embeddings": 256}  # fmt: skip
GOAL = 1.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pairs", type=int, default=8, help="DPO pairs per step (default: 8); instruct: their 2x sequences"
    )
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per worker (default: 3)")
    parser.add_argument("--work-dir", type=Path, help="where the model and data go (default: a temp dir)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.bench.machine import describe_machine
    from mmwb.runtime import resolve_device

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        model_bytes = make_model(work)
        report: dict[str, Any] = {
            "machine": describe_machine(resolve_device("cpu")),
            "model_bytes": model_bytes,
        }
        for mode in ("instruct", "dpo"):
            report[mode] = _worker(mode, work, args.pairs, args.steps)
    instruct, dpo = report["instruct"], report["dpo"]
    report["peak_ratio"] = dpo["peak_rss"] / instruct["peak_rss"]
    report["step_ratio"] = (dpo["peak_rss"] - dpo["loaded_rss"]) / (
        instruct["peak_rss"] - instruct["loaded_rss"]
    )
    report["copy_would_add_ratio"] = (dpo["peak_rss"] + model_bytes) / instruct["peak_rss"]
    report["goal"] = GOAL
    report["exit_code"] = 0 if report["peak_ratio"] <= GOAL else 1
    if not args.json:
        mb = 2**20
        print(f"model: {model_bytes / mb:.0f} MB of weights (fp32)")
        for mode in ("instruct", "dpo"):
            r = report[mode]
            print(f"{mode:9s} peak RSS {r['peak_rss'] / mb:7.0f} MB (after loading {r['loaded_rss'] / mb:.0f} MB), "
                  f"{r['sequences']} sequences a step, loss {r['loss']:.4f}")  # fmt: skip
        print(f"DPO / instruct peak RSS: {report['peak_ratio']:.3f} (goal <= {GOAL}); what the steps added: "
              f"{report['step_ratio']:.2f}x; with a reference copy it would be "
              f">= {report['copy_would_add_ratio']:.2f}")  # fmt: skip
    return report


def make_model(work: Path) -> int:
    """A random VLM folder (shipped tower spec and tokenizer, a ~230 M parameter dense decoder) and shapes data;
    returns the decoder's weight bytes."""
    from mmwb.data.shapes import write_dataset
    from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
    from mmwb.models.loading import from_pretrained
    from mmwb.models.projectors import make_projector
    from mmwb.models.vlm.parts import build_tower
    from mmwb.pipelines.vlm import DEFAULT_MODEL
    from mmwb.runtime import seed_everything
    from mmwb.train.vlm_setup import assemble

    seed_everything(0)
    shipped = from_pretrained(DEFAULT_MODEL)
    tok = shipped.tokenizer
    config = DecoderConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, **DECODER)  # fmt: skip
    decoder = DecoderForCausalLM(config)
    tower = build_tower(shipped.config.vision)
    projector = make_projector(
        "mlp2x_gelu", tower.hidden_size, config.hidden_size, len(tok), tok.pad_token_id
    )
    vlm = assemble(tower, projector, decoder, tok, shipped.config.vision)
    vlm.config.template = shipped.config.template
    vlm.save_pretrained(work / "model")
    write_dataset(work / "data", 64, seed=0, size=64, n_eval=4, progress=False)
    return sum(p.numel() * p.element_size() for p in decoder.parameters())


def _worker(mode: str, work: Path, pairs: int, steps: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "mmwb.bench.dpo", mode, str(work), str(pairs), str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(mode: str, work: Path, pairs: int, steps: int) -> dict[str, Any]:
    """One process, one kind of step: load, LoRA, ``steps`` AdamW steps; peak and after-load RSS in bytes."""
    import resource

    import numpy as np
    import psutil
    import torch

    from mmwb.data.captions import ImageTextRecord, Turn
    from mmwb.data.preferences import rule_pairs
    from mmwb.data.shapes import read_index
    from mmwb.models.loading import from_pretrained
    from mmwb.models.vlm.prompt import caption_question, make_encoder, model_tokens
    from mmwb.runtime import seed_everything
    from mmwb.train.dpo import DPOConfig, DPOTraining, Policy, collate_pairs, pair_encoder
    from mmwb.train.image_features import ProcessedPixels
    from mmwb.train.instruct import InstructTraining, LoraSettings, add_lora
    from mmwb.train.multimodal import collate

    seed_everything(0)
    torch.set_num_threads(2)
    vlm = from_pretrained(work / "model")
    loaded = psutil.Process().memory_info().rss
    lora = LoraSettings(r=16, alpha=32)
    peft = add_lora(vlm, lora, train_projector=mode == "instruct")
    vlm.language_model.train()
    load = ProcessedPixels(vlm.image_processor())
    data = work / "data"
    rng = np.random.default_rng(0)
    chosen = [p for r in read_index(data, "train") for p in rule_pairs(r, rng) if p.prompt is None][:pairs]
    policy = Policy(vlm.language_model, vlm.tokenizer, vlm, peft)
    if mode == "instruct":  # the same 2P sequences (every chosen and rejected caption) as plain targets
        module = InstructTraining(vlm)
        tokens = model_tokens(vlm.tokenizer, vlm.config.image_token_id)
        encode = make_encoder(vlm.tokenizer, vlm.config.template, 112, **tokens)
        question = caption_question(vlm.config.template)
        texts = [(p.image, p.chosen) for p in chosen] + [(p.image, p.rejected) for p in chosen]
        records = [
            ImageTextRecord(image, (Turn("user", question), Turn("assistant", t))) for image, t in texts
        ]
        batch = collate([load(data / r.image) | encode(r) for r in records], vlm.tokenizer.pad_token_id)
    else:
        module = DPOTraining(policy, DPOConfig(lora=lora))
        encode = pair_encoder(policy, 112, {})
        batch = collate_pairs([load(data / p.image) | encode(p) for p in chosen], vlm.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(steps):
        out = module(**batch)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_rss": peak, "loaded_rss": loaded, "loss": float(loss), "sequences": len(batch["input_ids"])}


if __name__ == "__main__":
    mode_, work_, pairs_, steps_ = sys.argv[1:5]
    print(json.dumps(worker(mode_, Path(work_), int(pairs_), int(steps_))))
