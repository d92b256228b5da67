"""``mmwb bench decoder --size kimi-vl-a3b``: a model of the real size on this machine, quantized while it loads.

The bench writes random weights of Kimi-VL-A3B's language model (a DeepSeek-V3 text model: hidden 2048, 27 layers,
MLA with kv_lora_rank 512, 64 routed experts top-6 + 2 shared, vocab 163840; ``--layers N`` keeps the first N) as a
bf16 transformers ``deepseek_v3`` checkpoint, as released: one matrix per expert, shards of ``SHARD_BYTES``,
written shard by shard so that writing never holds the model. Then, for each ``--quantize`` mode, a fresh process
loads it with ``mmwb.from_pretrained(quantize=...)`` and reports:

- load seconds, peak and final resident memory (RSS, and its anonymous part: RSS less file-backed pages);
- batch-1 decode tokens/s after a 64-token prompt ((T(n) - T(1)) / (n - 1)), the bytes a step reads, and the share
  of the machine's copy bandwidth that makes;
- time to first token for one 448x448 image + 64 text tokens: MoonViT (Kimi-VL's widths, random, bf16), the
  pixel-shuffle projector (bf16), and the prefill of the 256 image + 64 text embeddings through the quantized model.

transformers' row: its ``from_pretrained`` of the same folder in a fresh process whose address space is capped at
the machine's memory, so that a load that cannot fit fails in that process instead of the kernel's OOM killer
picking a process; what it ends with is the result. The cap counts address space, not memory: the checkpoint
transformers maps counts too, so the failure comes earlier than memory would run out (the bf16 weights alone
exceed the machine's memory, which is why it must fail).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch

from mmwb.errors import MmwbError

SIZE = "kimi-vl-a3b"
SHARD_BYTES = 2 << 30
PROMPT_TOKENS = 64  # text tokens after the image, and the decode prompt
IMAGE_SIDE = 448  # pixels: a 32 x 32 patch grid of 14, 256 tokens after the 2 x 2 merge
TEXT_CONFIG: dict[str, Any] = {  # Kimi-VL-A3B's text_config (DeepSeek-V3 architecture, Moonlight widths)
    "model_type": "deepseek_v3",
    "vocab_size": 163840,
    "hidden_size": 2048,
    "intermediate_size": 11264,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "routed_scaling_factor": 2.446,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 800000.0,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "dtype": "bfloat16",
}


def text_config(layers: int | None) -> dict[str, Any]:
    config = dict(TEXT_CONFIG)
    if layers is not None:
        config["num_hidden_layers"] = layers
    return config


# --- writing the checkpoint ---


def checkpoint_tensors(config: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a transformers deepseek_v3 checkpoint of ``config``, in mmwb's model order:
    the names and shapes mmwb's own import plan asks for (so the folder is what mmwb and transformers read)."""
    from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
    from mmwb.models.decoder.checkpoint import hf_recipe

    cfg = DecoderConfig.from_hf_config(config)
    with torch.device("meta"):
        model = DecoderForCausalLM(cfg)
    recipe_for = hf_recipe("deepseek_v3", config, cfg)
    for name, tensor in model.state_dict().items():
        recipe = recipe_for(name, tuple(tensor.shape), set())
        yield from zip(recipe.sources, recipe.shapes, strict=True)


class _RandomBf16:
    """Random bf16 tensors at memory speed: slices of one seeded normal pool at random offsets (the values only
    need to look like trained weights to the router and the kernels, not to be independent)."""

    def __init__(self, seed: int, pool: int = 1 << 24) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(2 * pool, generator=self.generator).to(torch.bfloat16)
        self.size = pool

    def __call__(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.bfloat16).view(-1)
        for start in range(0, out.numel(), self.size):
            n = min(self.size, out.numel() - start)
            offset = int(torch.randint(0, self.size, (1,), generator=self.generator))
            out[start : start + n] = self.pool[offset : offset + n]
        return out.mul_(std).view(shape)


def write_checkpoint(folder: Path, config: dict[str, Any], seed: int = 0) -> int:
    """A bf16 deepseek_v3 folder of random weights (config.json, shards, index), one shard in memory at a time;
    returns the bytes written. Norm weights are 1, the expert-selection bias 0, matrices N(0, 0.02)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for stale in [
        *folder.glob("*.safetensors"),
        folder / "model.safetensors.index.json",
        folder / "config.json",
    ]:
        stale.unlink(missing_ok=True)  # another layer count's shards would be read (and counted) too
    random = _RandomBf16(seed)
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        index = len(shards) + 1
        save_file(shard, folder / f"part-{index:05d}.safetensors", metadata={"format": "pt"})
        shards.append(list(shard))
        shard, size = {}, 0

    for name, shape in checkpoint_tensors(config):
        if name.endswith("e_score_correction_bias"):
            tensor = torch.zeros(shape, dtype=torch.float32)
        elif len(shape) == 1:  # norms
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = random(shape, 0.02)
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    count = len(shards)
    weight_map = {}
    for index, names in enumerate(shards, 1):
        final = f"model-{index:05d}-of-{count:05d}.safetensors"
        (folder / f"part-{index:05d}.safetensors").rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["DeepseekV3ForCausalLM"]}))
    return total


# --- measuring in a fresh process ---


@contextmanager
def peak_memory() -> Iterator[dict[str, int]]:
    """Peak RSS and peak anonymous memory (RSS less file-backed pages) of this process over the block, sampled
    every millisecond, plus the figures at its end (the dict is filled when the block ends)."""
    from mmwb.runtime import track_peak_memory

    figures: dict[str, int] = {}
    with track_peak_memory(torch.device("cpu"), interval_s=0.001) as memory:
        yield figures
    figures.update(
        peak_rss=memory.peak_bytes,
        peak_anonymous=memory.peak_anonymous_bytes,
        final_rss=memory.final_bytes,
        final_anonymous=memory.final_anonymous_bytes,
    )


def measure_mmwb(folder: str, mode: str, group_size: int, new_tokens: int, threads: int | None) -> dict:
    """In a fresh process: load ``folder`` quantized, then decode and time to first token (see the module)."""
    import mmwb
    from mmwb.bench.machine import active_decode_bytes, copy_bandwidth
    from mmwb.models.decoder import generate

    if threads:
        torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    result: dict[str, Any] = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    start = time.perf_counter()
    with peak_memory() as memory:
        model = mmwb.from_pretrained(folder, quantize=mode, group_size=group_size)
    result["load_s"] = time.perf_counter() - start
    result["load_memory"] = memory
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), generator=generator)
    mask = torch.ones_like(ids)

    def timed(n: int) -> float:
        begin = time.perf_counter()
        with torch.no_grad():
            generate(model, ids, attention_mask=mask, max_new_tokens=n)
        return time.perf_counter() - begin

    timed(2)  # warm-up
    bandwidth = copy_bandwidth(cpu)
    one, full = min(timed(1) for _ in range(2)), min(timed(new_tokens) for _ in range(2))
    bandwidth = (bandwidth + copy_bandwidth(cpu)) / 2
    rate = (new_tokens - 1) / (full - one)
    read = active_decode_bytes(model, PROMPT_TOKENS + new_tokens // 2)
    result["decode"] = {
        "new_tokens": new_tokens,
        "tokens_per_s": rate,
        "bytes_per_token": read,
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "bandwidth_utilisation": read * rate / bandwidth,
        "roofline_tokens_per_s": bandwidth / read,
    }
    result["first_token"] = time_to_first_token(model)
    result["final_rss_with_tower"] = psutil.Process().memory_info().rss
    return result


def time_to_first_token(model: Any) -> dict[str, float]:
    """Seconds of each part for one 448x448 image + 64 text tokens: MoonViT and the projector in bf16 (Kimi-VL's
    widths, random weights), then the prefill of the 320 embeddings and the first token's logits."""
    from mmwb.models.projectors.pixel_shuffle import PixelShuffleMLP
    from mmwb.models.vision.base import PixelInputs
    from mmwb.models.vision.moonvit import MoonViT, MoonViTConfig

    vision = MoonViTConfig()
    with torch.device("meta"):
        tower = MoonViT(vision)
        projector = PixelShuffleMLP(vision.hidden_size, model.config.hidden_size, vision.merge_kernel)
    random = _RandomBf16(1)
    for part in (tower, projector):
        part.to_empty(device="cpu")
        for param in part.parameters():
            shape = tuple(param.shape)
            param.data = random(shape, 0.02) if param.dim() > 1 else torch.ones(shape, dtype=torch.bfloat16)
    side = IMAGE_SIDE // vision.patch_size
    patches = torch.randn(side * side, 3, vision.patch_size, vision.patch_size, dtype=torch.bfloat16)
    inputs = PixelInputs(patches, torch.tensor([[side, side]]))
    text = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS))
    seconds: dict[str, float] = {}
    with torch.no_grad():
        tower.encode(inputs)  # warm-up (first calls allocate)
        begin = time.perf_counter()
        features = tower.encode(inputs)
        seconds["tower_s"] = time.perf_counter() - begin
        begin = time.perf_counter()
        image = projector(features).features  # (256, hidden)
        seconds["projector_s"] = time.perf_counter() - begin
        embeds = torch.cat([image.to(model.dtype), model.model.embed_tokens(text)[0]])[None]
        begin = time.perf_counter()
        length = embeds.shape[1]
        cache = model.allocate_cache(1, length + 1)
        positions = torch.arange(length)[None]
        logits = model.step(None, cache=cache, cache_position=0, position_ids=positions, attention_mask=None,
                            inputs_embeds=embeds, logits_to_keep=1)  # fmt: skip
        logits.argmax(-1)
        seconds["prefill_s"] = time.perf_counter() - begin
    seconds["prefill_tokens"] = length
    seconds["image_tokens"] = image.shape[0]
    seconds["total_s"] = seconds["tower_s"] + seconds["projector_s"] + seconds["prefill_s"]
    return seconds


def measure_transformers(folder: str, limit_bytes: int) -> dict:
    """In a fresh process capped at ``limit_bytes`` of address space: transformers' own load of the folder in
    bf16, then one greedy token if the load got that far."""
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    result: dict[str, Any] = {"address_space_limit_gb": limit_bytes / 1e9}
    start = time.perf_counter()
    try:
        with peak_memory() as memory:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        result.update(loaded=True, load_s=time.perf_counter() - start, load_memory=memory)
        ids = torch.zeros(1, PROMPT_TOKENS, dtype=torch.long)
        begin = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=False)
        result["two_tokens_s"] = time.perf_counter() - begin
    except (MemoryError, RuntimeError, OSError) as err:  # what "does not fit" looks like from inside
        result.update(loaded=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        result["after_s"] = time.perf_counter() - start
    return result


def in_fresh_process(function: Any, *args: Any) -> dict:
    """``function(*args)`` in a new interpreter (spawned), so its memory figures start from an empty heap; a
    child killed on its way (the OOM killer) is an error here, not a wait."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(function, *args).result()
        except BrokenProcessPool as err:
            raise MmwbError(f"bench decoder --size {SIZE}: the measuring process died ({err})") from err


# --- the bench ---


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.bench.machine import describe_machine

    config = text_config(args.layers)
    report: dict[str, Any] = {
        "machine": describe_machine(torch.device("cpu")),
        "size": SIZE,
        "layers": config["num_hidden_layers"],
        "memory_gb": psutil.virtual_memory().total / 1e9,
        "modes": {},
    }
    keep = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    with tempfile.TemporaryDirectory(prefix="mmwb-bench-kimi-", dir=os.environ.get("TMPDIR")) as scratch:
        folder = keep or Path(scratch) / "checkpoint"
        if (
            not (folder / "config.json").is_file()
            or json.loads((folder / "config.json").read_text()).get("num_hidden_layers")
            != config["num_hidden_layers"]
        ):
            _log(f"writing {config['num_hidden_layers']} layers of random bf16 weights to {folder}")
            begin = time.perf_counter()
            report["checkpoint_bytes"] = write_checkpoint(folder, config, args.seed or 0)
            report["write_s"] = time.perf_counter() - begin
        else:
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            report["checkpoint_bytes"] = index["metadata"]["total_size"]
        new_tokens = min(args.new_tokens, 32)
        for mode in args.quantize or ["int8", "int4"]:
            _log(f"{mode}: loading and timing in a fresh process")
            report["modes"][mode] = in_fresh_process(
                measure_mmwb, str(folder), mode, args.group_size, new_tokens, args.threads
            )
        if not args.skip_transformers:
            _log("transformers: loading in a fresh process capped at the machine's memory")
            limit = psutil.virtual_memory().total
            report["transformers"] = in_fresh_process(measure_transformers, str(folder), limit)
    if not args.json:
        print(format_report(report))
    return report


def _log(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def format_report(report: dict[str, Any]) -> str:
    gb = 1e9
    machine = report["machine"]
    lines = [
        f"mmwb bench decoder ({report['size']}, {report['layers']} layers, checkpoint "
        f"{report['checkpoint_bytes'] / gb:.1f} GB bf16) on {machine['cpu']} ({machine['usable_cpus']} CPUs, "
        f"{report['memory_gb']:.1f} GB)"
    ]
    for mode, r in report["modes"].items():
        m, d, f = r["load_memory"], r["decode"], r["first_token"]
        group = f" g{r['group_size']}" if r["group_size"] else ""
        lines += [
            f"{mode}{group}: load {r['load_s']:.0f} s, peak RSS {m['peak_rss'] / gb:.2f} GB (anonymous "
            f"{m['peak_anonymous'] / gb:.2f}), final RSS {m['final_rss'] / gb:.2f} GB",
            f"  decode (batch 1): {d['tokens_per_s']:.2f} tok/s; {d['bytes_per_token'] / gb:.2f} GB read a token = "
            f"{d['bandwidth_utilisation']:.2f} of {d['copy_bandwidth_gbs']:.1f} GB/s (roofline "
            f"{d['roofline_tokens_per_s']:.1f} tok/s)",
            f"  first token (448x448 image + {PROMPT_TOKENS} text tokens): {f['total_s']:.2f} s = tower "
            f"{f['tower_s']:.2f} + projector {f['projector_s']:.3f} + prefill of {f['prefill_tokens']} "
            f"{f['prefill_s']:.2f}",
        ]
    theirs = report.get("transformers")
    if theirs is not None:
        if theirs["loaded"]:
            m = theirs["load_memory"]
            lines.append(
                f"transformers bf16: loaded in {theirs['load_s']:.0f} s, peak RSS {m['peak_rss'] / gb:.2f} GB; "
                f"2 tokens in {theirs['two_tokens_s']:.1f} s"
            )
        else:
            lines.append(
                f"transformers bf16: did not load within {theirs['address_space_limit_gb']:.1f} GB "
                f"(after {theirs['after_s']:.0f} s: {theirs['error']})"
            )
    return "\n".join(lines)
