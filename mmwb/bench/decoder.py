"""``mmwb bench decoder``: mmwb's MoE decoder against transformers on the same random weights, in one run.

For each variant (DeepSeek-V3 with MLA; Qwen3-MoE with GQA) a transformers model is built from a seeded random
init, saved, and loaded into mmwb with ``mmwb.from_pretrained``, so both sides hold identical weights. Both run on
the same device, dtype and threads; calls alternate which side goes first and every figure is a median over
repeats after a warm-up, reported as the ratio mmwb / transformers (higher is better for rates, lower for memory).
transformers runs with the fastest of its experts implementations, picked per phase by a timed trial.

- decode tokens/s: greedy ``generate`` with the KV cache; (T(n new) - T(1 new)) isolates the decode steps from the
  prefill; the greedy tokens of both sides are compared as a sanity check;
- prefill tokens/s: one cached forward over the prompt batch, logits for the last position only (both sides);
- training tokens/s: forward + backward of the LM loss;
- peak memory: peak process memory added while decoding / training (RSS on CPU with glibc's dynamic mmap threshold
  switched off so freed tensors go back to the OS; the CUDA allocator's peak on GPUs);
- KV-cache bytes per token and the decode memory-bandwidth utilisation: bytes a batch-1 decode step must read
  (active weights + the cache) times tokens/s over the machine's copy bandwidth, measured just before and just
  after the batch-1 decode timings (a shared VM's bandwidth drifts between minutes; its decode speed with it);
- ``--quantize int8 int4``: batch-1 decode of weight-only quantized copies against mmwb fp32, and with
  ``--llama-cpp DIR`` llama.cpp's Q8_0 / Q4_0 of the same weights (mmwb.bench.llama_cpp).

``--size kimi-vl-a3b`` runs another bench: the real model's widths, quantized while loading
(mmwb.bench.large_decoder).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HELP = (
    "Time mmwb's MoE decoder against transformers on the same random weights (decode and prefill tokens/s, "
    "training step, peak memory, KV bytes per token, bandwidth utilisation) and print the ratios."
)
VARIANTS = ("mla", "gqa")
# Shapes of the random models: "bench-small" is the default (about 87M parameters), "tiny" is for tests.
SIZES: dict[str, dict[str, int]] = {
    "bench-small": {"vocab": 32000, "hidden": 512, "layers": 8, "heads": 8, "experts": 16, "expert_dim": 256},
    "tiny": {"vocab": 512, "hidden": 64, "layers": 2, "heads": 4, "experts": 4, "expert_dim": 32},
}
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--size", choices=[*SIZES, "kimi-vl-a3b"], default="bench-small",
        help="model shape; kimi-vl-a3b: the real model's widths, written as a bf16 checkpoint and loaded quantized "
        "(mmwb.bench.large_decoder; decode after a 64-token prompt, at most 32 new tokens)",
    )  # fmt: skip
    parser.add_argument("--layers", type=int, help="kimi-vl-a3b: keep the first N of its 27 layers")
    parser.add_argument(
        "--checkpoint-dir",
        help="kimi-vl-a3b: write (or reuse) the random checkpoint here, not in a temp folder",
    )
    parser.add_argument(
        "--skip-transformers", action="store_true", help="kimi-vl-a3b: leave out transformers' load attempt"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (default: 3)")
    parser.add_argument("--prompt-len", type=int, default=128, help="decode prompt length (default: 128)")
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens (default: 128)")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4], help="default: 1 4")
    parser.add_argument("--prefill-shape", type=int, nargs=2, default=[4, 256], metavar=("BATCH", "LEN"))
    parser.add_argument("--train-shape", type=int, nargs=2, default=[2, 256], metavar=("BATCH", "LEN"))
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's choice)")
    parser.add_argument("--skip-train", action="store_true", help="leave out the training step")
    parser.add_argument(
        "--quantize", nargs="+", choices=["int8", "int4"], default=[],
        help="also time batch-1 decode of weight-only quantized copies against mmwb fp32 (CPU)",
    )  # fmt: skip
    parser.add_argument("--group-size", type=int, choices=[32, 64, 128], default=64, help="int4 group size")
    parser.add_argument(
        "--llama-cpp", metavar="DIR",
        help="with --quantize: also time llama.cpp (Q8_0 / Q4_0 of the same weights) from this built llama.cpp "
        "tree (mmwb.bench.llama_cpp)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.bench.machine import describe_machine
    from mmwb.runtime import resolve_device, resolve_precision
    from mmwb.runtime.memory import unmap_large_blocks

    if args.size == "kimi-vl-a3b":
        from mmwb.bench import large_decoder
        from mmwb.errors import MmwbConfigError

        if args.llama_cpp:
            raise MmwbConfigError(
                "--llama-cpp runs beside the paired sizes (bench-small, tiny), not kimi-vl-a3b"
            )
        return large_decoder.run(args)
    if args.llama_cpp:  # checked before minutes of timing, not after
        from mmwb.bench.llama_cpp import LlamaCpp
        from mmwb.errors import MmwbConfigError

        if not args.quantize:
            raise MmwbConfigError(
                "--llama-cpp times llama.cpp beside --quantize int8 / int4: give --quantize"
            )
        LlamaCpp.find(args.llama_cpp)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_precision(args.dtype, device).param_dtype
    seed = 0 if args.seed is None else args.seed
    unmap_large_blocks()
    report: dict[str, Any] = {
        "machine": describe_machine(device),
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
        "variants": {},
    }
    for variant in args.variants:
        report["variants"][variant] = bench_variant(variant, args, device, dtype, seed)
    if not args.json:
        print(format_report(report))
    return report


# --- the two models ---


def hf_model(variant: str, size: str, seed: int) -> Any:
    """A seeded random transformers model: DeepSeek-V3 (MLA, 1 shared expert, first layer dense) or Qwen3-MoE."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    s = SIZES[size]
    common = dict(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        moe_intermediate_size=s["expert_dim"],
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if variant == "mla":
        head = s["hidden"] // s["heads"]
        config = DeepseekV3Config(
            **common,
            num_key_value_heads=s["heads"],
            intermediate_size=s["hidden"] * 11 // 4,
            n_routed_experts=s["experts"],
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=s["hidden"] // 4,
            qk_nope_head_dim=head,
            qk_rope_head_dim=head // 2,
            v_head_dim=head,
        )
        model = DeepseekV3ForCausalLM(config)
    else:
        config = Qwen3MoeConfig(
            **common,
            num_key_value_heads=max(1, s["heads"] // 4),
            head_dim=s["hidden"] // s["heads"],
            intermediate_size=s["hidden"] * 11 // 4,
            num_experts=s["experts"],
            norm_topk_prob=True,
        )
        model = Qwen3MoeForCausalLM(config)
    model.generation_config.eos_token_id = None  # always decode the full length
    model.generation_config.pad_token_id = 0
    return model.eval()


def load_pair(
    variant: str, size: str, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[Any, Any]:
    """(mmwb model, transformers model) holding the same weights: the reference saved, then imported by mmwb."""
    import mmwb

    reference = hf_model(variant, size, seed)
    with tempfile.TemporaryDirectory(prefix="mmwb-bench-decoder-") as folder:
        reference.save_pretrained(folder)
        ours = mmwb.from_pretrained(Path(folder), device=device, dtype=dtype).eval()
    return ours, reference.to(device=device, dtype=dtype)


# --- timing ---


def paired_medians(
    calls: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median seconds of each call: one warm-up each, then rounds that alternate which side goes first."""
    from mmwb.runtime import Timer

    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for index in range(repeats):
        for name in names if index % 2 == 0 else reversed(names):
            with Timer(device) as timer:
                calls[name]()
            times[name].append(timer.seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def fastest_experts_implementation(reference: Any, call: Callable[[], object], device: torch.device) -> str:
    """transformers' experts implementation that runs ``call`` fastest here (one warm-up, median of two)."""
    from mmwb.runtime import median_time

    seconds = {}
    for name in EXPERTS_IMPLEMENTATIONS:
        try:
            reference.set_experts_implementation(name)
            seconds[name] = median_time(call, device, repeats=2, warmup=1)
        except (ValueError, KeyError, RuntimeError, NotImplementedError):
            continue
    best = min(seconds, key=seconds.get)
    reference.set_experts_implementation(best)
    return best


def peak_added_bytes(call: Callable[[], object], device: torch.device) -> int:
    from mmwb.runtime import track_peak_memory

    with track_peak_memory(device) as peak:
        call()
    return peak.added_bytes


# --- phases ---


def bench_variant(
    variant: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, Any]:
    from mmwb.bench.machine import active_decode_bytes, copy_bandwidth

    ours, reference = load_pair(variant, args.size, device, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = ours.config.vocab_size
    result: dict[str, Any] = {
        "params": sum(p.numel() for p in ours.parameters()),
        "kv_bytes_per_token": {
            "mmwb": ours.cache_bytes_per_token(),
            "transformers": hf_cache_bytes(reference),
        },
        "decode": {},
    }
    for batch in args.decode_batches:
        ids = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen).to(device)
        before = copy_bandwidth(device) if batch == 1 else None
        result["decode"][str(batch)] = bench_decode(ours, reference, ids, args.new_tokens, args.repeats)
        if before is not None:  # the roofline of the same minutes as the batch-1 decode
            result["copy_bandwidth_gbs"] = [before / 1e9, copy_bandwidth(device) / 1e9]
    _log(f"{variant}: decode done")
    prefill_ids = torch.randint(0, vocab, tuple(args.prefill_shape), generator=gen).to(device)
    result["prefill"] = bench_prefill(ours, reference, prefill_ids, args.repeats)
    _log(f"{variant}: prefill done")
    if not args.skip_train:
        train_ids = torch.randint(0, vocab, tuple(args.train_shape), generator=gen).to(device)
        result["train"] = bench_train(ours, reference, train_ids, args.repeats)
        _log(f"{variant}: training done")
    one = result["decode"].get("1")
    if one is not None:
        bytes_per_token = active_decode_bytes(ours, args.prompt_len + args.new_tokens // 2)
        bandwidth = statistics.mean(result["copy_bandwidth_gbs"]) * 1e9
        result["decode_bandwidth_utilisation"] = {
            side: bytes_per_token * one["tokens_per_s"][side] / bandwidth for side in ("mmwb", "transformers")
        }
        result["decode_bytes_per_token"] = bytes_per_token
    if args.quantize:
        ids = torch.randint(0, vocab, (1, args.prompt_len), generator=gen).to(device)
        result["quantized"] = bench_quantized(ours, reference, ids, args, result)
        if args.llama_cpp:
            bench_llama_cpp(reference, args, result["quantized"])
            _log(f"{variant}: llama.cpp done")
        _log(f"{variant}: quantized decode done")
    return result


def bench_quantized(
    ours: Any, reference: Any, ids: torch.Tensor, args: argparse.Namespace, result: dict[str, Any]
) -> dict:
    """Batch-1 decode of int8 / int4 copies of ``ours`` against ``ours`` itself (paired, same prompt), with the
    bytes a step reads and the share of the copy bandwidth that makes; transformers' fp32 rate from the decode
    phase above gives the second ratio. With int8 and torchao installed, transformers with torchao's int8
    weight-only config on the same weights runs in the same rounds (its linear layers; torchao leaves
    transformers' fused experts alone)."""
    import copy

    from mmwb.bench.machine import active_decode_bytes, copy_bandwidth
    from mmwb.models.decoder import generate
    from mmwb.models.quantize import quantize_model

    context = args.prompt_len + args.new_tokens // 2
    mask = torch.ones_like(ids)
    models = {"fp32": ours}
    for mode in args.quantize:
        models[mode] = quantize_model(copy.deepcopy(ours), mode, args.group_size)
    torchao = _torchao_int8(reference) if "int8" in args.quantize else None

    def call(model: Any, n: int) -> Callable[[], torch.Tensor]:
        if model is torchao:
            return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        return lambda: generate(model, ids, attention_mask=mask, max_new_tokens=n)

    if torchao is not None:
        models["torchao_int8"] = torchao

    before = copy_bandwidth(ids.device)
    with torch.no_grad():
        full = paired_medians(
            {k: call(m, args.new_tokens) for k, m in models.items()}, ids.device, args.repeats
        )
        first = paired_medians({k: call(m, 1) for k, m in models.items()}, ids.device, args.repeats)
        new = {k: call(m, args.new_tokens)()[:, ids.shape[1] :] for k, m in models.items()}
    bandwidth = (before + copy_bandwidth(ids.device)) / 2
    rates = {k: (args.new_tokens - 1) / (full[k] - first[k]) for k in models}
    theirs = result["decode"].get("1", {}).get("tokens_per_s", {}).get("transformers")
    report = {}
    for mode in args.quantize:
        read = active_decode_bytes(models[mode], context)
        report[mode] = {
            "tokens_per_s": rates[mode],
            "fp32_tokens_per_s": rates["fp32"],
            "ratio_vs_mmwb_fp32": rates[mode] / rates["fp32"],
            "ratio_vs_transformers_fp32": rates[mode] / theirs if theirs else None,
            "bytes_per_token": read,
            "bandwidth_utilisation": read * rates[mode] / bandwidth,
            "copy_bandwidth_gbs": bandwidth / 1e9,
            "same_tokens_as_fp32": (new[mode] == new["fp32"]).float().mean().item(),  # of the generated ones
        }
    if torchao is not None:
        report["int8"]["torchao_int8_tokens_per_s"] = rates["torchao_int8"]
        report["int8"]["ratio_vs_torchao_int8"] = rates["int8"] / rates["torchao_int8"]
    return report


def _torchao_int8(reference: Any) -> Any | None:
    """A copy of the transformers model with torchao's int8 weight-only config, or None without torchao (CPU
    only: that is where this comparison is asked for)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    if reference.device.type != "cpu":
        return None
    import copy

    model = copy.deepcopy(reference)
    quantize_(model, Int8WeightOnlyConfig())
    return model


def bench_llama_cpp(reference: Any, args: argparse.Namespace, quantized: dict[str, dict]) -> None:
    """llama.cpp's decode rate for each quantized mode, on the weights of ``reference`` (see
    mmwb.bench.llama_cpp), added to ``quantized[mode]`` with mmwb's ratio to it."""
    from mmwb.bench import llama_cpp
    from mmwb.errors import MmwbConfigError

    llama = llama_cpp.LlamaCpp.find(args.llama_cpp)
    threads = args.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="mmwb-bench-llama-") as scratch:
        folder = Path(scratch) / "model"
        reference.save_pretrained(folder)
        llama_cpp.write_tokenizer(folder, reference.config.vocab_size)
        for mode, result in quantized.items():
            peer: dict[str, Any] = {"type": llama_cpp.GGUF_TYPES[mode]}
            try:
                gguf = llama_cpp.to_gguf(llama, folder, Path(scratch) / f"{mode}.gguf", mode)
                rate = llama_cpp.decode_rate(
                    llama, gguf, threads, args.prompt_len, args.new_tokens, args.repeats
                )
                peer.update(tokens_per_s=rate, ratio_mmwb_vs_llama_cpp=result["tokens_per_s"] / rate)
            except (
                MmwbConfigError
            ) as err:  # a model llama.cpp cannot take is its row's result, not the run's end
                peer["error"] = str(err)
            result["llama_cpp"] = peer


def bench_decode(
    ours: Any, reference: Any, ids: torch.Tensor, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Greedy generation of ``new_tokens``; decode time is T(new_tokens) - T(1) so the prefill cancels out."""
    from mmwb.models.decoder import generate

    mask = torch.ones_like(ids)

    def ours_call(n: int) -> Callable[[], torch.Tensor]:
        return lambda: generate(ours, ids, attention_mask=mask, max_new_tokens=n)

    def theirs_call(n: int) -> Callable[[], torch.Tensor]:
        return lambda: reference.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)

    with torch.no_grad():
        implementation = fastest_experts_implementation(reference, theirs_call(8), ids.device)
        same = torch.equal(ours_call(new_tokens)(), theirs_call(new_tokens)())
        full = paired_medians(
            {"mmwb": ours_call(new_tokens), "transformers": theirs_call(new_tokens)}, ids.device, repeats
        )
        first = paired_medians({"mmwb": ours_call(1), "transformers": theirs_call(1)}, ids.device, repeats)
        memory = {
            "mmwb": peak_added_bytes(ours_call(new_tokens), ids.device),
            "transformers": peak_added_bytes(theirs_call(new_tokens), ids.device),
        }
    tokens = ids.shape[0] * (new_tokens - 1)
    rates = {side: tokens / (full[side] - first[side]) if full[side] > first[side] else 0.0 for side in full}
    return {
        "batch": ids.shape[0],
        "prompt_len": ids.shape[1],
        "new_tokens": new_tokens,
        "transformers_experts": implementation,
        "tokens_match": same,
        "tokens_per_s": rates,
        "ratio": _ratio(rates),
        "generate_s": full,
        "peak_added_bytes": memory,
        "memory_ratio": _ratio(memory),
    }


def bench_prefill(ours: Any, reference: Any, ids: torch.Tensor, repeats: int) -> dict[str, Any]:
    """One cached forward over the prompt batch keeping the last position's logits (what generate does)."""
    batch, length = ids.shape
    mask = torch.ones_like(ids)
    positions = torch.arange(length, device=ids.device).expand(batch, -1)

    def ours_call() -> torch.Tensor:
        cache = ours.allocate_cache(batch, length)
        return ours.step(
            ids, cache=cache, cache_position=0, position_ids=positions, attention_mask=mask, logits_to_keep=1
        )

    def theirs_call() -> torch.Tensor:
        return reference(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits

    with torch.no_grad():
        implementation = fastest_experts_implementation(reference, theirs_call, ids.device)
        seconds = paired_medians({"mmwb": ours_call, "transformers": theirs_call}, ids.device, repeats)
    return _throughput([batch, length], implementation, seconds)


def bench_train(ours: Any, reference: Any, ids: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Forward + backward of the LM loss (gradients dropped after each step)."""
    batch, length = ids.shape

    def step(model: Any) -> Callable[[], None]:
        def call() -> None:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        return call

    ours.train()
    reference.train()
    try:
        implementation = fastest_experts_implementation(reference, step(reference), ids.device)
        seconds = paired_medians({"mmwb": step(ours), "transformers": step(reference)}, ids.device, repeats)
        memory = {
            "mmwb": peak_added_bytes(step(ours), ids.device),
            "transformers": peak_added_bytes(step(reference), ids.device),
        }
    finally:
        for model in (ours, reference):
            model.zero_grad(set_to_none=True)
            model.eval()
    result = _throughput([batch, length], implementation, seconds)
    return {**result, "peak_added_bytes": memory, "memory_ratio": _ratio(memory)}


def _throughput(shape: list[int], implementation: str, seconds: dict[str, float]) -> dict[str, Any]:
    """Tokens/s of each side for a (batch, length) call and their ratio."""
    rates = {side: shape[0] * shape[1] / s for side, s in seconds.items()}
    return {
        "shape": shape,
        "transformers_experts": implementation,
        "tokens_per_s": rates,
        "ratio": _ratio(rates),
    }


# --- derived figures ---


def hf_cache_bytes(reference: Any) -> int:
    """Bytes per token of transformers' KV cache, read off the cache of a short forward pass."""
    length = 4
    ids = torch.zeros(1, length, dtype=torch.long, device=reference.device)
    with torch.no_grad():
        out = reference(input_ids=ids, use_cache=True)
    cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.24
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total // length


def _ratio(pair: dict[str, float]) -> float | None:
    return pair["mmwb"] / pair["transformers"] if pair["transformers"] else None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_report(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"mmwb bench decoder ({report['size']}, {report['dtype']}) on {machine['cpu']} "
        f"({machine['usable_cpus']} CPUs, {machine['torch_threads']} threads, device {machine['device']})",
        f"{'variant':<8}{'figure':<34}{'mmwb':>12}{'transformers':>14}{'ratio':>8}  note",
    ]

    def row(variant: str, figure: str, pair: dict[str, float], ratio: float | None, note: str = "") -> None:
        text = f"{ratio:.2f}" if ratio is not None else "-"
        lines.append(
            f"{variant:<8}{figure:<34}{pair['mmwb']:>12.4g}{pair['transformers']:>14.4g}{text:>8}  {note}"
        )

    for variant, result in report["variants"].items():
        for batch, decode in result["decode"].items():
            note = f"hf experts={decode['transformers_experts']}, same tokens: {decode['tokens_match']}"
            row(variant, f"decode tok/s (batch {batch})", decode["tokens_per_s"], decode["ratio"], note)
            mib = {k: v / 2**20 for k, v in decode["peak_added_bytes"].items()}
            row(variant, f"decode peak MiB (batch {batch})", mib, decode["memory_ratio"])
        prefill = result["prefill"]
        shape = "x".join(map(str, prefill["shape"]))
        note = f"hf experts={prefill['transformers_experts']}"
        row(variant, f"prefill tok/s ({shape})", prefill["tokens_per_s"], prefill["ratio"], note)
        if "train" in result:
            train = result["train"]
            shape = "x".join(map(str, train["shape"]))
            note = f"hf experts={train['transformers_experts']}"
            row(variant, f"train tok/s ({shape})", train["tokens_per_s"], train["ratio"], note)
            mib = {k: v / 2**20 for k, v in train["peak_added_bytes"].items()}
            row(variant, "train peak MiB", mib, train["memory_ratio"])
        kv = result["kv_bytes_per_token"]
        row(variant, "KV cache bytes/token", kv, _ratio(kv))
        if "decode_bandwidth_utilisation" in result:
            use = result["decode_bandwidth_utilisation"]
            before, after = result["copy_bandwidth_gbs"]
            note = f"of copy bandwidth {before:.1f} / {after:.1f} GB/s before / after the decode"
            row(variant, "decode bandwidth use (batch 1)", use, _ratio(use), note)
        for mode, q in result.get("quantized", {}).items():
            versus = q["ratio_vs_transformers_fp32"]
            lines.append(
                f"{variant:<8}{'decode tok/s ' + mode + ' (batch 1)':<34}{q['tokens_per_s']:>12.4g}"
                f"{'':>14}{q['ratio_vs_mmwb_fp32']:>8.2f}  x mmwb fp32 ({q['fp32_tokens_per_s']:.4g} tok/s); "
                + (f"{versus:.2f} x transformers fp32; " if versus else "")
                + f"{q['bytes_per_token'] / 2**20:.1f} MiB/token read = {q['bandwidth_utilisation']:.2f} of "
                f"{q['copy_bandwidth_gbs']:.1f} GB/s; same tokens as fp32: {q['same_tokens_as_fp32']:.2f}"
            )
            if "torchao_int8_tokens_per_s" in q:
                lines.append(
                    f"{variant:<8}{'decode tok/s transformers+torchao':<34}{'':>12}"
                    f"{q['torchao_int8_tokens_per_s']:>14.4g}{q['ratio_vs_torchao_int8']:>8.2f}  "
                    "mmwb int8 / transformers with torchao's int8 weight-only config"
                )
            peer = q.get("llama_cpp")
            if peer is not None and "error" in peer:
                lines.append(f"{variant:<8}{'decode tok/s llama.cpp ' + peer['type']:<34}  {peer['error']}")
            elif peer is not None:
                lines.append(
                    f"{variant:<8}{'decode tok/s llama.cpp ' + peer['type']:<34}{peer['tokens_per_s']:>12.4g}"
                    f"{'':>14}{peer['ratio_mmwb_vs_llama_cpp']:>8.2f}  mmwb {mode} / llama.cpp {peer['type']}"
                )
    return "\n".join(lines)
