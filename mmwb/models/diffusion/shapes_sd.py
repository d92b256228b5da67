"""The shipped default: a tiny Stable Diffusion for 32×32 shapes images, and where its files live.

Same layout as SD 1.x (CLIP tokenizer and text encoder, KL autoencoder, cross-attention UNet, and SD's DDIM scheduler from
``schedulers.sd_scheduler``), so
diffusers' ``StableDiffusionControlNetPipeline`` runs it unchanged; only the sizes shrink. The VAE downsamples by
2 (32×32 pixels -> 16×16×4 latents) rather than SD's 8, which keeps the shapes' edges sharp after decoding, and
the UNet's attention then works on 256 positions, cheap enough to train on a shared CPU in minutes.
The CLIP tokenizer's BPE merges are learned offline from the captions (no download), so every word of the
shapes grammar is one token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from diffusers import AutoencoderKL, UNet2DConditionModel
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mmwb.runtime.resources import shipped_model

BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # CLIP's start and end tokens
DEFAULT_MODEL = shipped_model("shapes-sd")
DEFAULT_CONTROLNET = shipped_model("shapes-controlnet-canny")
IMAGE_SIZE = 32
MAX_PROMPT_TOKENS = 32  # the longest shapes caption is 16 tokens with its start and end markers
CHANNELS = (32, 64, 64)  # UNet channels per resolution level
VAE_CHANNELS = (16, 32)  # narrow at full resolution, where the autoencoder spends most of its time
TEXT_WIDTH = 64
# CLIP's own word split: contractions, letter runs, single digits, runs of other symbols
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 600) -> CLIPTokenizer:
    """A CLIP tokenizer (byte-level BPE with ``</w>`` word ends) whose merges are fitted to ``texts``.

    The vocabulary holds all 256 byte symbols, with and without the word end, before the learned merges, so any
    prompt still tokenizes; unknown words just take more tokens.
    """
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((text.lower() for text in texts), trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = [BOS, EOS, *alphabet, *(f"{char}</w>" for char in alphabet)]
    known = set(symbols)
    symbols += [s for s in sorted(learned["vocab"], key=learned["vocab"].get) if s not in known]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in learned["merges"]]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_PROMPT_TOKENS)


def text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 3-layer, 64-wide CLIP text encoder over ``tokenizer``'s vocabulary."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=TEXT_WIDTH,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def vae() -> AutoencoderKL:
    """KL autoencoder, 32×32×3 <-> 16×16×4 (``scaling_factor`` is set from data after training)."""
    return AutoencoderKL(
        block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def unet() -> UNet2DConditionModel:
    """Cross-attention UNet on 16×16 latents: attention at the two finer levels, 8-wide heads."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        block_out_channels=CHANNELS,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=16,
    )
