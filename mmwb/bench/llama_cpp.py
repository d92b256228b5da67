"""llama.cpp's row in ``mmwb bench decoder --quantize ... --llama-cpp DIR``: the peer CPU users pick today.

The bench's transformers model (the same random weights mmwb runs) is written as a transformers folder with a
made-up byte-level BPE tokenizer of the model's vocabulary size (the converter wants one; decode speed does not
depend on it), converted with llama.cpp's own ``convert_hf_to_gguf.py`` (Q8_0 beside int8; f32, then
``llama-quantize`` Q4_0 beside int4), and timed with ``llama-bench`` on the same threads: batch-1 generation of
``--new-tokens`` tokens after ``--prompt-len`` tokens of context, as mmwb's decode rate is measured.

``DIR`` is a llama.cpp source tree built outside mmwb's tree, e.g. the one ``llama-cpp-python``'s source package
vendors (BENCHMARKS.md gives the commands): ``DIR/convert_hf_to_gguf.py`` and ``DIR/build/bin/llama-bench`` and
``llama-quantize``. The converter identifies tokenizers by a hash of their output and refuses unknown ones; for
the made-up tokenizer it is told "gpt-2" (the pre-tokenizer it imitates).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mmwb.errors import MmwbConfigError

GGUF_TYPES = {"int8": "Q8_0", "int4": "Q4_0"}  # llama.cpp's formats beside mmwb's
_CONVERT = """
import runpy, sys
root = sys.argv[1]
sys.path.insert(0, root)
import conversion.base as base  # the converter's own module: identify the made-up tokenizer as GPT-2's
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [root + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp tree: its converter and the two tools the bench runs."""

    root: Path

    @property
    def converter(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    def tool(self, name: str) -> Path:
        return self.root / "build" / "bin" / name

    @classmethod
    def find(cls, root: str | Path) -> LlamaCpp:
        found = cls(Path(root))
        missing = [
            str(p)
            for p in (
                found.converter,
                found.root / "conversion" / "base.py",  # the converter's module this bench patches
                found.tool("llama-bench"),
                found.tool("llama-quantize"),
            )
            if not p.is_file()
        ]
        if missing:
            raise MmwbConfigError(
                f"--llama-cpp {root}: not a built llama.cpp tree (missing {', '.join(missing)}); build it with "
                "`cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-bench "
                "llama-quantize -j 2` (BENCHMARKS.md)"
            )
        return found


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens: the 256 bytes, then merges of byte pairs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = list(pre_tokenizers.ByteLevel.alphabet())
    byte_tokens.sort()
    vocab = {token: index for index, token in enumerate(byte_tokens)}
    merges = []
    for first in byte_tokens:
        for second in byte_tokens:
            if len(vocab) >= vocab_size:
                break
            vocab[first + second] = len(vocab)
            merges.append((first, second))
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=byte_tokens[0], eos_token=byte_tokens[1]
    ).save_pretrained(folder)


def to_gguf(llama: LlamaCpp, model_folder: Path, out: Path, mode: str) -> Path:
    """The transformers folder as a GGUF file of ``GGUF_TYPES[mode]``."""
    if mode == "int8":
        _run([sys.executable, "-c", _CONVERT, str(llama.root), str(model_folder), "--outtype", "q8_0",
              "--outfile", str(out)])  # fmt: skip
        return out
    full = out.with_suffix(".f32.gguf")
    _run([sys.executable, "-c", _CONVERT, str(llama.root), str(model_folder), "--outtype", "f32",
          "--outfile", str(full)])  # fmt: skip
    _run([str(llama.tool("llama-quantize")), str(full), str(out), GGUF_TYPES[mode]])
    full.unlink()
    return out


def decode_rate(llama: LlamaCpp, gguf: Path, threads: int, context: int, tokens: int, repeats: int) -> float:
    """llama-bench's tokens/s generating ``tokens`` after ``context`` tokens of context, batch 1."""
    out = _run([str(llama.tool("llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", "0",
                "-n", str(tokens), "-d", str(context), "-r", str(repeats), "-o", "json"])  # fmt: skip
    results = json.loads(out)
    return float(results[0]["avg_ts"])


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise MmwbConfigError(f"llama.cpp: {Path(command[0]).name} failed: {' | '.join(tail)}")
    return done.stdout
