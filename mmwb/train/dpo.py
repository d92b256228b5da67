"""Preference tuning (DPO, IPO, hinge) of an mmwb VLM or a text decoder on chosen/rejected pairs.

Each step holds P pairs as 2P sequences (chosen rows, then rejected rows) sharing their prompt; a VLM's images are
read once per pair (the tower's features, cached or fresh, are repeated for the two rows). The reference model is
never a second copy: with LoRA (default) it is the policy with its adapters switched off (peft's
``disable_adapter``), so only the adapters train; without LoRA the whole language model trains and the reference
log-probabilities are computed once before training, saved beside the run and read back on resume.

``sft_weight`` adds the chosen responses' NLL (RPO), which keeps them likely while the margin grows.

Logged per step: loss, reward accuracy and margin, the chosen/rejected rewards and log-probs, and a KL estimate to
the reference (the mean policy-minus-reference log-probability of the pairs' responses; a KL when the responses are
the policy's own samples, as on-policy pairs are); with ``train.eval_every`` a VLM's captions and VQA by type on
the evaluation split. At the end the merged model is saved and, for a VLM, scored on that split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from mmwb.data.captions import ImageTextDataset, ImageTextRecord, Turn
from mmwb.data.io import atomic_write_path, load_image
from mmwb.data.preferences import PreferencePair, read_preferences, write_preferences
from mmwb.data.tokenizer import load_tokenizer
from mmwb.errors import MmwbConfigError, MmwbError, MmwbInputError
from mmwb.models.decoder.model import IGNORE_INDEX
from mmwb.models.loading import from_pretrained
from mmwb.models.vision.base import VisionFeatures
from mmwb.models.vlm import VisionLanguageModel
from mmwb.models.vlm.prompt import caption_question, make_encoder, model_tokens
from mmwb.pipelines.preferences import PreferenceSettings, make_preferences
from mmwb.pipelines.vlm_eval import EvaluationConfig, evaluate_vlm
from mmwb.runtime import resolve_device, seed_everything
from mmwb.train.checkpoint import save_model_folder
from mmwb.train.config import TrainConfig
from mmwb.train.dpo_loss import dpo_loss
from mmwb.train.engine import Trainer, TrainResult
from mmwb.train.image_features import FeatureCacheConfig, ProcessedPixels, batch_features
from mmwb.train.instruct import LoraSettings, add_lora, lora_adapters, merged
from mmwb.train.multimodal import collate_images, collate_text
from mmwb.train.recipes import write_metrics
from mmwb.train.vlm_loss import token_losses
from mmwb.train.vlm_trainer import Unregistered, evaluate_saved, trained_state, vlm_trainer

log = logging.getLogger(__name__)
REFERENCE_FILE = "reference_logps.safetensors"  # under train.out_dir, without LoRA


@dataclass
class DPOConfig:
    """One preference-tuning run (``mmwb train dpo``)."""

    model_dir: Path = Path("runs/instruct/model")  # a VLM (mmwb's, or imported LLaVA/Kimi) or a text decoder
    pairs_file: Path = Path("runs/preferences/preferences.jsonl")  # mmwb.data.preferences lines
    # the pairs' image root, and the shapes folder whose test split the result is scored on
    data_dir: Path = Path("data/shapes")
    # when set and pairs_file does not exist yet, the run first makes the pairs from model_dir on data_dir
    preferences: PreferenceSettings | None = None
    out_dir: Path = Path("runs/dpo/model")  # the tuned (merged) model
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only)
    # + sft_weight x the chosen responses' mean token NLL (RPO; trl: loss_type [..., "sft"], loss_weights [1, w]):
    # keeps the chosen answers likely while the margin grows, where DPO alone can push both down
    sft_weight: float = 0.0
    lora: LoraSettings | None = field(default_factory=LoraSettings)  # null: the whole language model trains
    # without LoRA: the vision tower and projector train too (the reference is cached, so anything may move)
    train_vision: bool = False
    max_length: int = 112
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir=Path("runs/dpo")))


@dataclass
class Policy:
    """What trains: the language model (LoRA-adapted in place, or whole), with the VLM around it when there is
    one, and its tokenizer."""

    language_model: nn.Module
    tokenizer: Any
    vlm: VisionLanguageModel | None = None
    peft: PeftModel | None = None


def text_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of the labelled tokens' log-probabilities ``(N,)`` and their count ``(N,)``, for a causal LM
    that maps ``input_ids`` / ``attention_mask`` to ``.logits`` (mmwb's decoder, any transformers model)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]  # (N, T): the next token's label
    token_logps = -F.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    labelled = targets != IGNORE_INDEX
    return (token_logps * labelled).sum(1), labelled.sum(1)


def vlm_logps(vlm: VisionLanguageModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``text_logps`` for a VLM's pair batch: the P images' features read once, each spliced into both rows."""
    features = batch_features(vlm, batch)
    losses, labelled = token_losses(vlm, batch, features=_twice(features))
    return -(losses * labelled).sum(1), labelled.sum(1)


def _twice(features: VisionFeatures) -> VisionFeatures:
    """Features of images ``[1..P]`` as those of ``[1..P, 1..P]`` (chosen rows, then rejected rows)."""
    return VisionFeatures(
        torch.cat([features.features, features.features]),
        list(features.token_counts) * 2,
        list(features.grid_hw) * 2,
    )


def sft_loss(chosen_logps: torch.Tensor, chosen_counts: torch.Tensor) -> torch.Tensor:
    """The chosen responses' negative log-likelihood per token, over all of the batch's chosen tokens (trl's
    ``sft`` loss)."""
    return -chosen_logps.sum() / chosen_counts.sum().clamp(min=1)


class DPOTraining(nn.Module):
    """The engine's model: ``forward(**pair_batch) -> (loss, metrics)``; checkpoints hold the trained tensors."""

    def __init__(self, policy: Policy, config: DPOConfig) -> None:
        super().__init__()
        self.language_model = policy.language_model
        self.held = Unregistered(policy.vlm) if policy.vlm is not None else None
        if (
            config.train_vision and policy.vlm is not None
        ):  # registered: the optimizer and checkpoints see them
            self.vision_tower, self.projector = policy.vlm.vision_tower, policy.vlm.projector
        self.peft = [policy.peft]  # a list: not registered twice under another name
        self.config = config

    def train(self, mode: bool = True) -> DPOTraining:
        """A trained tower keeps its BatchNorm statistics (eval mode): in batch-statistics mode the policy would
        differ from its cached reference before the first update."""
        super().train(mode)
        if hasattr(self, "vision_tower"):
            self.vision_tower.eval()
        return self

    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.held is not None:
            return vlm_logps(self.held.vlm, batch)
        return text_logps(self.language_model, batch)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_logps" in batch:  # cached before training (no LoRA)
            return batch["ref_logps"]
        with torch.no_grad(), self.peft[0].disable_adapter():
            return self.logps(batch)[0]

    def forward(self, **batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy, counts = self.logps(batch)  # (2P,) sums over each response, (2P,) its token count
        reference = self.reference_logps(batch)
        c = self.config
        scale = 1 / counts.clamp(min=1) if c.loss_type == "ipo" else 1.0  # trl's IPO: per-token averages
        pairs = len(policy) // 2
        losses, *_ = dpo_loss(
            (policy * scale)[:pairs], (policy * scale)[pairs:], (reference * scale)[:pairs],
            (reference * scale)[pairs:], c.beta, c.loss_type, c.label_smoothing,
        )  # fmt: skip
        rewards = c.beta * (policy - reference).detach()  # on the sums, as trl logs them for every loss
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        loss = losses.mean()
        if c.sft_weight:
            loss = loss + c.sft_weight * sft_loss(policy[:pairs], counts[:pairs])
        metrics = {
            "reward_accuracy": (chosen > rejected).float().mean(),
            "reward_margin": (chosen - rejected).mean(),
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
            "logps_chosen": policy[:pairs].detach().mean(),
            "logps_rejected": policy[pairs:].detach().mean(),
            "kl_estimate": (policy - reference).detach().mean(),
        }
        return loss, metrics

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return trained_state(self, super().state_dict(*args, **kwargs), kwargs.get("prefix", ""))


class PairDataset(Dataset):
    """Text-only pairs (a decoder's): item = ``encode(pair)``."""

    def __init__(self, pairs: list[PreferencePair], encode) -> None:
        self.pairs, self.encode = pairs, encode

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.encode(self.pairs[index])


def pair_encoder(policy: Policy, max_length: int, references: dict[PreferencePair, torch.Tensor]):
    """``pair -> item``: both responses' ids and labels after the same prompt (the VLM's chat format, or for a
    text decoder the start token and its tokenizer's encoding of the prompt), plus the pair's cached reference
    log-probs ``(2,)`` once ``references`` holds them (filled before training starts, when there is no LoRA)."""
    if policy.vlm is not None:
        vlm = policy.vlm
        tokens = model_tokens(vlm.tokenizer, vlm.config.image_token_id)
        encode_turns = make_encoder(
            vlm.tokenizer, vlm.config.template, max_length, **tokens, conversation=True
        )

        def encode_one(pair: PreferencePair, answer: str) -> dict[str, torch.Tensor]:
            question = pair.prompt if pair.prompt is not None else _caption_prompt(vlm.config.template)
            return encode_turns(
                ImageTextRecord(pair.image, (Turn("user", question), Turn("assistant", answer)))
            )
    else:
        tok = policy.tokenizer

        def encode_one(pair: PreferencePair, answer: str) -> dict[str, torch.Tensor]:
            prompt = tok(pair.prompt or "").input_ids
            bos = [] if tok.bos_token_id is None or prompt[:1] == [tok.bos_token_id] else [tok.bos_token_id]
            prompt = bos + prompt  # the start token first, as the decoder was pretrained
            response = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids = (prompt + response)[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
            return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    def encode(pair: PreferencePair) -> dict[str, torch.Tensor]:
        chosen, rejected = encode_one(pair, pair.chosen), encode_one(pair, pair.rejected)
        item = {
            f"{side}_{k}": v
            for side, row in (("chosen", chosen), ("rejected", rejected))
            for k, v in row.items()
        }
        if references:
            item["ref_logps"] = references[pair]
        return item

    return encode


def _caption_prompt(template: str) -> str:
    """The user turn that asks for a caption in ``template`` (plain: none)."""
    return "" if template == "plain" else caption_question(template)


def collate_pairs(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """P pair items -> 2P rows (chosen, then rejected), the P images once, and the cached reference log-probs."""
    rows = [
        {"input_ids": it[f"{side}_input_ids"], "labels": it[f"{side}_labels"]}
        for side in ("chosen", "rejected")
        for it in items
    ]
    batch = collate_text(rows, pad_id)
    if "features" in items[0] or "pixel_values" in items[0]:
        batch |= collate_images(items)
    if "ref_logps" in items[0]:
        batch["ref_logps"] = torch.stack([it["ref_logps"] for it in items]).T.reshape(-1)  # (2P,)
    return batch


def load_policy(config: DPOConfig, model: nn.Module | None = None) -> Policy:
    """The model to tune (``model``, or loaded from ``model_dir``), frozen but for what trains: LoRA adapters
    (default), or the whole language model."""
    model = model if model is not None else from_pretrained(config.model_dir, device="cpu")
    vlm = model if isinstance(model, VisionLanguageModel) else None
    if vlm is None and getattr(model, "tokenizer", None) is None:
        model.tokenizer = load_tokenizer(config.model_dir)
    language_model = vlm.language_model if vlm is not None else model
    if vlm is not None:
        vlm.requires_grad_(False)
        vlm.vision_tower.eval()
    else:
        model.requires_grad_(False)
    peft = None
    if config.lora is not None:
        if vlm is not None:
            peft = add_lora(vlm, config.lora, train_projector=False)
        else:
            peft = lora_adapters(model, config.lora)
    else:
        language_model.requires_grad_(True)
        if config.train_vision and vlm is not None:  # its BatchNorm statistics stay as they are (eval mode)
            vlm.vision_tower.requires_grad_(True)
            vlm.projector.requires_grad_(True)
    language_model.train()
    tokenizer = vlm.tokenizer if vlm is not None else model.tokenizer
    return Policy(language_model, tokenizer, vlm, peft)


def check_pairs(pairs: list[PreferencePair], config: DPOConfig, is_vlm: bool) -> None:
    """Every pair's image opens (a VLM's) before anything is computed: the run never starts half-prepared. Each
    image is read once; an error names the first line that uses it."""
    where = Path(config.pairs_file)
    checked: set[str] = set()
    for pair in pairs if is_vlm else ():
        if pair.image is None:
            raise MmwbInputError(
                f"{where}:{pair.line}: no image, but {config.model_dir} is a vision-language model"
            )
        if pair.image in checked:
            continue
        try:
            load_image(Path(config.data_dir) / pair.image)
        except MmwbError as err:
            raise MmwbInputError(f"{where}:{pair.line}: {err}") from err
        checked.add(pair.image)


@torch.no_grad()
def cached_references(
    module: DPOTraining, pairs: list[PreferencePair], dataset: Dataset, collate, config: DPOConfig, device
) -> dict[PreferencePair, torch.Tensor]:
    """Every pair's reference log-prob sums ``(2,)`` (chosen, rejected), computed once with the model as it is
    before training and saved under ``train.out_dir``; a resumed run reads them back when the pairs file, model
    and length limit are the same."""
    path = Path(config.train.out_dir) / REFERENCE_FILE
    key = _reference_key(config)
    logps = None
    if path.is_file():
        saved = load_file(path)
        if "key" in saved and bytes(saved["key"].tolist()).decode() == key:
            log.info("reference log-probs read from %s", path)
            logps = saved["logps"]
    if logps is None:
        was_training = module.training
        module.eval()
        rows, size = [], config.train.batch_size
        starts = range(0, len(dataset), size)
        for start in tqdm(
            starts, desc="reference log-probs", unit="batch", disable=not config.train.progress
        ):
            batch = collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
            rows.append(module.logps(send_to_device(batch, device))[0].view(2, -1).T.cpu())  # (P, 2)
        module.train(was_training)
        logps = torch.cat(rows).float()
        with atomic_write_path(path) as tmp:  # other ranks may be reading it
            save_file({"logps": logps, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, str(tmp))
        log.info("reference log-probs of %d pairs cached in %s", len(logps), path)
    return dict(zip(pairs, logps, strict=True))


def _reference_key(config: DPOConfig) -> str:
    """What the cached reference depends on: the pairs, the model's files (a model retrained in place has new
    ones), the images' root, the length limit and the precision."""
    folder = Path(config.model_dir)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return json.dumps(
        {
            "pairs": hashlib.sha256(Path(config.pairs_file).read_bytes()).hexdigest(),
            "model": [str(folder.resolve()), files],
            "images": str(Path(config.data_dir).resolve()),
            "max_length": config.max_length,
            "precision": config.train.precision,
        }
    )


def train_dpo(config: DPOConfig) -> tuple[TrainResult, bool]:
    """Make the pairs if asked, check them, train, save the merged model in ``out_dir``; returns the engine's
    result and whether the model is a VLM (a text decoder has no captions to score)."""
    seed_everything(config.train.seed)
    if config.train_vision and config.lora is not None:
        raise MmwbConfigError("train_vision needs lora: null (with LoRA the reference is the frozen rest)")
    model = None  # loaded once: to make the pairs if asked, else after the pairs file has been checked
    if config.preferences is not None and not Path(config.pairs_file).is_file():
        model = from_pretrained(config.model_dir, device=resolve_device(config.train.device))
        make_pairs_file(config, model)
    pairs = read_preferences(config.pairs_file)
    policy = load_policy(config, model)
    check_pairs(pairs, config, policy.vlm is not None)
    module = DPOTraining(policy, config)
    references: dict[PreferencePair, torch.Tensor] = {}
    encode = pair_encoder(policy, config.max_length, references)
    pad_id = policy.tokenizer.pad_token_id or 0

    def collate(items):
        return collate_pairs(items, pad_id)

    trainer = _trainer(module, policy, pairs, encode, collate, config)  # places the model on its device
    if config.lora is None:  # the reference, once, from the model before any update
        dataset = _dataset(policy, pairs, encode, config)
        with trainer.accelerator.autocast():  # the precision the policy runs in: equal before step 1
            references.update(
                cached_references(module, pairs, dataset, collate, config, trainer.accelerator.device)
            )
    result = trainer.run()
    if trainer.accelerator.is_main_process:
        model = policy.vlm if policy.vlm is not None else policy.language_model
        if policy.peft is not None:
            model = (
                merged(policy.vlm, policy.peft) if policy.vlm is not None else policy.peft.merge_and_unload()
            )
        save_model_folder(model, Path(config.out_dir))
    return result, policy.vlm is not None


def _dataset(policy: Policy, pairs: list[PreferencePair], encode, config: DPOConfig) -> Dataset:
    """The pairs with their images' pixels (the reference pass reads each once)."""
    if policy.vlm is None:
        return PairDataset(pairs, encode)
    return ImageTextDataset(pairs, config.data_dir, ProcessedPixels(policy.vlm.image_processor()), encode)


def _trainer(module: DPOTraining, policy: Policy, pairs, encode, collate, config: DPOConfig) -> Trainer:
    if policy.vlm is not None:
        # a trained tower's features change every step: nothing to cache
        cache = FeatureCacheConfig(enabled=False) if config.train_vision else config.feature_cache
        return vlm_trainer(module, policy.vlm, pairs, config.data_dir, encode, config.train, cache, collate,
                           _task_metrics(policy.vlm, config))  # fmt: skip
    return Trainer(module, lambda model, batch: model(**batch), PairDataset(pairs, encode), config.train,
                   collate_fn=collate)  # fmt: skip


def _task_metrics(vlm: VisionLanguageModel, config: DPOConfig):
    """With ``train.eval_every``: the current policy's captions and VQA on the evaluation split every so many
    steps (the engine logs them as ``eval_*``); None otherwise (the saved model is scored at the end anyway)."""
    split = Path(config.data_dir) / f"{config.evaluation.split}.jsonl"
    if not config.train.eval_every or config.evaluation.max_items <= 0 or not split.is_file():
        return None

    def evaluate(_module: nn.Module) -> dict[str, float]:
        metrics, _ = evaluate_vlm(vlm, Path(config.data_dir), config.evaluation, vqa=True, progress=False)
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    return evaluate


def make_pairs_file(config: DPOConfig, vlm: nn.Module) -> dict[str, Any]:
    """``config.preferences`` applied to ``vlm`` (loaded from ``model_dir``) on ``data_dir``: the pairs file and
    its summary beside it."""
    if not isinstance(vlm, VisionLanguageModel):
        raise MmwbConfigError(f"{config.model_dir}: preferences are made by a VLM on shapes data")
    pairs, summary = make_preferences(vlm, Path(config.data_dir), config.preferences, config.train.progress)
    summary = {**summary, "model": str(config.model_dir)}
    write_preferences(pairs, Path(config.pairs_file), summary)
    log.info("preference pairs: %s", summary)
    return summary


def run_dpo_stage(config: DPOConfig) -> dict[str, Any]:
    """A recipe's DPO stage: pairs (made if missing), training, then the test split's captions and VQA."""
    started = time.perf_counter()
    result, is_vlm = train_dpo(config)
    metrics = {"stage": "dpo", "steps": result.step, "last_loss": result.last_loss}
    if is_vlm:
        metrics |= evaluate_saved(Path(config.out_dir), config.data_dir, config.evaluation, vqa=True)
    metrics["seconds"] = time.perf_counter() - started
    write_metrics(metrics, Path(config.out_dir))
    return metrics
