"""Random tiny VLM parts on the shapes data: an open_clip tower folder and a decoder folder with its tokenizer.

The alignment and instruction-tuning tests train on these: the same folder layout as stages 1-2 of
``mmwb recipe tiny-shapes`` (``vision/`` is an open_clip local-dir model,
``decoder/`` an mmwb decoder with the BPE tokenizer), with untrained weights from a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

from open_clip.model import CLIP

from mmwb.data.shapes import read_index, record_texts
from mmwb.data.tokenizer import train_bpe_tokenizer
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
from mmwb.runtime import seed_everything
from mmwb.train.clip import ClipModelConfig, open_clip_model_cfg, save_clip_folder
from mmwb.train.lm import decoder_config

TINY_CLIP = ClipModelConfig(
    embed_dim=32, image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_head_width=16,
    text_width=32, text_layers=1, text_heads=2, context_length=24,
)  # fmt: skip
TINY_DECODER = DecoderConfig(
    hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
    max_position_embeddings=256, tie_word_embeddings=True,
)  # fmt: skip


def make_tiny_parts(
    out: Path,
    data_dir: Path,
    seed: int = 0,
    clip: ClipModelConfig = TINY_CLIP,
    decoder: DecoderConfig = TINY_DECODER,
) -> tuple[Path, Path]:
    """Write ``out/vision`` and ``out/decoder``; returns both paths. The tokenizer is fitted on the train text."""
    tokenizer = train_bpe_tokenizer((t for r in read_index(data_dir, "train") for t in record_texts(r)), 256)
    vision, decoder_dir = Path(out) / "vision", Path(out) / "decoder"
    for folder in (vision, decoder_dir):
        folder.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    model_cfg = open_clip_model_cfg(clip, tokenizer)
    save_clip_folder(CLIP(**model_cfg), model_cfg, vision)
    tokenizer.save_pretrained(vision)
    DecoderForCausalLM(decoder_config(decoder, tokenizer)).save_pretrained(decoder_dir)
    tokenizer.save_pretrained(decoder_dir)
    return vision, decoder_dir
