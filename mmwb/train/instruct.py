"""Stage 2: instruction tuning with LoRA (peft) on the decoder and the projector fully trained.

LoRA goes on every attention projection, the shared experts' and dense layers' SwiGLU linears, and the routed
experts. mmwb stores each layer's routed experts stacked, as two 3-D ``nn.Parameter`` tensors for grouped GEMM
(``gate_up_proj (E, 2I, C)``, ``down_proj (E, C, I)``), not as ``nn.Linear`` modules, so ``target_modules`` cannot
reach them; peft's ``target_parameters`` can: its ``ParamWrapper`` gives each expert its own rank-r A/B pair and,
during the forward, parametrises the stacked tensor as ``W + scale * B_e A_e`` (a batched matmul), so mmwb's grouped
expert kernel runs unchanged and ``merge_and_unload`` folds the update back into the same tensor. (peft requires
``lora_dropout: 0`` for such parameters.) The router stays frozen, so routing only changes through the inputs.

Loss is on the assistant turns (answers and their end token) only. The tower stays frozen and uses the same
feature cache as stage 1. Checkpoints hold only the trained tensors (LoRA factors and projector); at the end the
run writes ``train.out_dir/adapter`` (peft adapter + projector + where the base model is) and, in ``out_dir``, the
merged VLM. ``mmwb export --merge-lora --model RUN_DIR --out DIR`` merges an adapter folder again at any time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from mmwb.data.captions import ImageTextRecord, draw_questions, read_records, split_turns
from mmwb.data.shapes import CELL_ATTRIBUTES, cell_labels, object_cells, object_centres, read_objects
from mmwb.errors import MmwbCheckpointError, MmwbConfigError, MmwbInputError
from mmwb.models.projectors.qformer import QFormerSize
from mmwb.models.vlm import VisionLanguageModel
from mmwb.models.vlm.prompt import caption_question, make_encoder, model_tokens
from mmwb.pipelines.vlm_eval import EvaluationConfig
from mmwb.runtime import seed_everything
from mmwb.train import checkpoint as ckpt
from mmwb.train.cell_loss import CellHead
from mmwb.train.checkpoint import save_model_folder
from mmwb.train.config import TrainConfig
from mmwb.train.engine import TrainResult, load_run_weights
from mmwb.train.grounding import (
    AttentionTap,
    GroundingConfig,
    grounding_loss,
    with_grounding,
)
from mmwb.train.image_features import FeatureCacheConfig, batch_features
from mmwb.train.recipes import write_metrics
from mmwb.train.relation_loss import RelationHead, RelationLossConfig, with_relations
from mmwb.train.vlm_loss import multimodal_loss
from mmwb.train.vlm_setup import freeze_all_but_projector, place, starting_vlm
from mmwb.train.vlm_trainer import Unregistered, evaluate_saved, trained_state, vlm_trainer

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"  # under train.out_dir
PROJECTOR_FILE = "projector.safetensors"
TOWER_FILE = "vision_tower.safetensors"  # only when the tower trained
BASE_FILE = "base.json"


@dataclass
class LoraSettings:
    """Which weights get LoRA factors; ``target_modules`` is matched whole against module names."""

    r: int = 16
    alpha: int = 32
    # not the router (``mlp.gate``): routing only changes through the inputs
    target_modules: str = (
        r".*\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj"  # GQA and MLA attention
        r"|gate_proj|up_proj|down_proj)"  # SwiGLU of shared experts and dense layers
    )
    target_experts: bool = True  # the stacked routed experts, through peft's target_parameters

    def peft_config(self, model: nn.Module | None = None) -> LoraConfig:
        """peft's config; routed experts are targeted only where ``model`` (when given) has them."""
        names = ("experts.gate_up_proj", "experts.down_proj")
        has_experts = model is None or any(n.endswith(names) for n, _ in model.named_parameters())
        experts = list(names) if self.target_experts and has_experts else None
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=0.0,
            target_modules=self.target_modules,
            target_parameters=experts,
            bias="none",
        )


@dataclass
class InstructConfig:
    """One stage-2 run on conversations: LLaVA JSON, or shapes JSONL whose QA pairs become turns."""

    data_dir: Path = Path("data/shapes")
    train_file: str = "train.jsonl"
    model_dir: Path | None = None  # the aligned VLM (stage 1's out_dir)
    vision_dir: Path | None = None  # or parts: tower folder, decoder folder ...
    decoder_dir: Path | None = None
    projector_from: Path | None = None  # ... and an align checkpoint (or run) whose projector starts stage 2
    projector: str = "mlp2x_gelu"
    select_layer: int = -2
    # the shape of a new Q-Former (projector: qformer)
    qformer: QFormerSize = field(default_factory=QFormerSize)
    max_length: int = 96
    # the prompt format (mmwb.models.vlm.prompt); the saved VLM keeps it
    template: Literal["chat", "chat_question_first", "instructblip"] = "chat"
    caption_turn: bool = True  # shapes JSONL: each image also trains "describe the image" -> its caption
    single_turn: bool = False  # each QA pair its own record (mmwb.data.captions.split_turns)
    # or: each image's caption N times and N of its questions drawn at random (mmwb.data.captions.draw_questions)
    question_draws: int = 0
    # with question_draws: how much likelier each question type (shapes QA "type") is drawn; others weigh 1
    question_weights: dict[str, float] = field(default_factory=dict)
    questions_per_record: int = 1  # with question_draws: different questions (turns) in each drawn record
    # weight of the tower's dense auxiliary loss (mmwb.train.cell_loss; shapes data, a tower with a fixed grid)
    cell_loss: float = 0.0
    # attention supervision: chosen heads look at the objects each question names (mmwb.train.grounding; shapes
    # data with "refers", a tower with a fixed grid)
    grounding: GroundingConfig | None = None
    # a linear head at the answer of each relative-position question predicts its two facts from one layer's input
    # (mmwb.train.relation_loss; shapes data)
    relation_loss: RelationLossConfig | None = None
    train_tower: bool = False  # also fine-tune the vision tower fully (Kimi-VL style); no feature cache then
    # or a new tower built from this spec and trained from scratch with the rest ({"type": "conv", "config": ...})
    tower: dict[str, Any] | None = None
    out_dir: Path = Path("runs/instruct/model")  # the merged VLM
    lora: LoraSettings | None = field(default_factory=LoraSettings)  # null: full fine-tuning of the decoder
    loss_average: Literal["sequence", "token"] = "sequence"  # see mmwb.train.vlm_loss.multimodal_loss
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)  # captions + VQA of the test split
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir=Path("runs/instruct")))


# stage 2 of tiny-shapes (end to end) and stage 4 of tiny-shapes-llava (LoRA)
InstructStageConfig = InstructConfig


class InstructTraining(nn.Module):
    """The engine's model: the VLM's projector, LoRA-wrapped language model and, when it trains, the vision tower
    (registered); a frozen tower rides along.

    ``state_dict`` keeps only trainable tensors, so checkpoints hold the projector and the LoRA factors, and a
    resume (which checks keys against ``state_dict``) expects exactly those.
    """

    def __init__(
        self,
        vlm: VisionLanguageModel,
        train_tower: bool = False,
        loss_average: str = "sequence",
        cell_head: CellHead | None = None,
        cell_weight: float = 0.0,
        grounding: GroundingConfig | None = None,
        relation_head: RelationHead | None = None,
        relation_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.loss_average = loss_average
        self.cell_head, self.cell_weight = cell_head, cell_weight  # training only: not part of the saved VLM
        self.grounding = grounding
        self.relation_head, self.relation_weight = relation_head, relation_weight  # training only, too
        if grounding is not None:
            self.tap = AttentionTap(vlm.language_model, [*grounding.heads, *grounding.answer_heads])
        self.projector = vlm.projector  # the same modules the VLM runs
        self.language_model = vlm.language_model
        self.trains_tower = train_tower
        if train_tower:
            self.vision_tower = vlm.vision_tower
        self.held = Unregistered(vlm)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The language model's loss, plus the weighted auxiliary losses (each also logged on its own)."""
        cells = batch.pop("cell_labels", None)
        ground = (
            batch.pop("ground_pos", None),
            batch.pop("ground_role", None),
            batch.pop("ground_cells", None),
        )
        relations = batch.pop("relation_pos", None), batch.pop("relation_facts", None)
        vlm = self.held.vlm
        if (
            (self.cell_head is None or cells is None)
            and self.grounding is None
            and self.relation_head is None
        ):
            return multimodal_loss(vlm, batch, self.loss_average)
        features = batch_features(vlm, batch)  # (B, N, C)
        parts = {}
        with ExitStack() as taps:  # what the auxiliary losses read inside the forward
            if self.grounding is not None:
                taps.enter_context(self.tap)
            if self.relation_head is not None:
                taps.enter_context(self.relation_head.watching(self.language_model))
            loss = multimodal_loss(vlm, batch, self.loss_average, features)
        image_start = (batch["input_ids"] == vlm.config.image_token_id).int().argmax(1)  # (B,)
        tokens = features.features.shape[1]
        if self.relation_head is not None:
            parts["relation_loss"] = self.relation_head.loss(image_start, tokens, *relations)
            loss = loss + self.relation_weight * parts["relation_loss"]
        if self.grounding is not None:
            parts["grounding_loss"] = grounding_loss(self.tap, self.grounding, image_start, tokens, *ground)
            loss = loss + self.grounding.weight * parts["grounding_loss"]
        if self.cell_head is not None and cells is not None:
            parts["cell_loss"] = self.cell_head.loss(features.features, cells)
            loss = loss + self.cell_weight * parts["cell_loss"]
        return loss, {key: value.detach() for key, value in parts.items()}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        state = trained_state(self, full, prefix)
        if self.trains_tower:  # its BatchNorm statistics change as it trains: a resume needs them too
            buffers = {prefix + name for name, _ in self.vision_tower.named_buffers(prefix="vision_tower")}
            state.update((key, value) for key, value in full.items() if key in buffers)
        return state


def add_lora(vlm: VisionLanguageModel, settings: LoraSettings, train_projector: bool = True) -> PeftModel:
    """Freeze the VLM, inject LoRA adapters (fp32) into its language model in place, train the projector fully
    (unless not ``train_projector``: DPO's reference is the model with its adapters off, so nothing else may move).

    Returns peft's handle (for saving and merging); ``vlm.language_model`` stays the same module, now adapted."""
    freeze_all_but_projector(vlm)
    vlm.projector.requires_grad_(train_projector)
    return lora_adapters(vlm.language_model, settings)


def lora_adapters(language_model: nn.Module, settings: LoraSettings) -> PeftModel:
    """LoRA adapters injected into ``language_model`` in place (its other weights frozen), kept in fp32 whatever
    the base dtype."""
    peft_model = get_peft_model(language_model, settings.peft_config(language_model))
    for param in language_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return peft_model


def train_whole_decoder(vlm: VisionLanguageModel) -> None:
    """Full fine-tuning: the projector and every weight of the language model train (no adapter to merge)."""
    freeze_all_but_projector(vlm)
    vlm.language_model.requires_grad_(True).train()


def train_instruct(config: InstructConfig) -> tuple[TrainResult, Path | None]:
    """LoRA (or full) + projector (+ tower) training; writes the adapter folder (with LoRA) and the merged VLM;
    returns the result and the adapter folder (None without LoRA)."""
    if config.single_turn and config.question_draws:
        raise MmwbConfigError("single_turn and question_draws choose the records two ways: set one of them")
    for key in ("question_weights", "questions_per_record"):
        if getattr(config, key) not in ({}, 1) and not config.question_draws:
            raise MmwbConfigError(f"{key} shapes the records of question_draws: set question_draws too")
    seed_everything(config.train.seed)
    vlm, peft_model, module = _trainable(config)
    cache = config.feature_cache
    if module.trains_tower:
        cache = FeatureCacheConfig(enabled=False)  # the tower's features change as it trains
    question = caption_question(config.template) if config.caption_turn else None
    records = read_records(Path(config.data_dir) / config.train_file, "qa", caption_question=question)
    if config.single_turn:
        records = split_turns(records)
    if config.question_draws:
        records = draw_questions(
            records,
            config.question_draws,
            config.train.seed,
            config.question_weights,
            config.questions_per_record,
        )
    tokens = model_tokens(vlm.tokenizer, vlm.config.image_token_id)
    encode = make_encoder(vlm.tokenizer, config.template, config.max_length, **tokens)
    if config.cell_loss or config.grounding is not None or config.relation_loss is not None:
        objects = read_objects(Path(config.data_dir) / config.train_file)
    if config.cell_loss:
        grid = tower_grid(vlm)
        encode = with_cell_labels(encode, {image: cell_labels(objs, grid) for image, objs in objects.items()})
    if config.grounding is not None:
        grid = tower_grid(vlm, "grounding")
        cells = {image: object_cells(objs, grid) for image, objs in objects.items()}
        captions = config.grounding.captions
        encode = with_grounding(encode, cells, vlm.tokenizer, config.template, **tokens, captions=captions)
    if config.relation_loss is not None:
        encode = with_relations(encode, {image: object_centres(objs) for image, objs in objects.items()})
    trainer = vlm_trainer(module, vlm, records, config.data_dir, encode, config.train, cache, shardable=True)
    result = trainer.run()
    adapter = Path(config.train.out_dir) / ADAPTER_DIR if peft_model is not None else None
    if trainer.accelerator.is_main_process:
        if (
            result.sharded
        ):  # the trained modules stay split across processes: build them again from the checkpoint
            vlm, peft_model, module = _trainable(config)
            load_run_weights(module, result)
            place(vlm, trainer.accelerator.device, trainer.accelerator.mixed_precision)  # as the run kept it
        if peft_model is not None:
            save_adapter(vlm, peft_model, base_of(config), adapter, module.trains_tower)
            vlm = merged(vlm, peft_model)
        save_model_folder(vlm, Path(config.out_dir))
    return result, adapter


def _trainable(config: InstructConfig) -> tuple[VisionLanguageModel, PeftModel | None, InstructTraining]:
    """The starting VLM with LoRA (or the whole decoder) made trainable, and the engine's module over it."""
    vlm = starting_vlm(
        config.model_dir,
        config.vision_dir,
        config.decoder_dir,
        config.projector,
        config.select_layer,
        qformer=config.qformer,
        new_tower=config.tower,
    )
    if config.projector_from is not None:
        load_projector(vlm.projector, config.projector_from)
    peft_model = add_lora(vlm, config.lora) if config.lora is not None else train_whole_decoder(vlm)
    train_tower = config.train_tower or config.tower is not None
    if train_tower:
        vlm.vision_tower.requires_grad_(True).train()
    vlm.config.template = config.template
    cell_head = None
    if config.cell_loss:
        if not train_tower:
            raise MmwbConfigError("cell_loss trains the vision tower: set tower (a new one) or train_tower")
        cell_head = CellHead(vlm.vision_tower.hidden_size, [len(names) + 1 for _, names in CELL_ATTRIBUTES])
    relation = config.relation_loss
    relation_head = RelationHead(vlm.language_model, relation.layer) if relation is not None else None
    module = InstructTraining(
        vlm,
        train_tower,
        config.loss_average,
        cell_head,
        config.cell_loss,
        config.grounding,
        relation_head,
        relation.weight if relation is not None else 0.0,
    )
    return vlm, peft_model, module


def tower_grid(vlm: VisionLanguageModel, needed_by: str = "cell_loss") -> int:
    """The side of a tower's fixed square token grid (the conv tower's), which cell targets are drawn on."""
    grid = getattr(getattr(vlm.vision_tower, "config", None), "grid", None)
    if not isinstance(grid, int):
        raise MmwbConfigError(
            f"{needed_by} needs a tower with a fixed square token grid (type 'conv'), "
            f"not {type(vlm.vision_tower).__name__}"
        )
    return grid


def with_cell_labels(
    encode: Callable[[ImageTextRecord], dict[str, torch.Tensor]], labels: dict[str, np.ndarray]
) -> Callable[[ImageTextRecord], dict[str, torch.Tensor]]:
    """``encode`` whose items also carry their image's ``cell_labels`` ``(N, A)``."""

    def encode_with_cells(record: ImageTextRecord) -> dict[str, torch.Tensor]:
        if record.image not in labels:
            raise MmwbInputError(f"{record.image}: no objects listed for this image, so no cell labels")
        return {**encode(record), "cell_labels": torch.from_numpy(labels[record.image])}

    return encode_with_cells


def base_of(config: InstructConfig) -> dict[str, Any]:
    """Where the frozen base model comes from, as the adapter folder records it."""
    keys = ("model_dir", "vision_dir", "decoder_dir", "projector", "select_layer", "qformer")
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items() if k in keys}


def save_adapter(
    vlm: VisionLanguageModel, peft_model: PeftModel, base: dict[str, Any], folder: Path, with_tower: bool
) -> None:
    """peft adapter files + the trained projector (and tower) + ``base.json``, published as one folder."""
    staging = ckpt.begin(folder)
    peft_model.save_pretrained(staging)
    trained = [(vlm.projector, PROJECTOR_FILE)] + ([(vlm.vision_tower, TOWER_FILE)] if with_tower else [])
    for module, name in trained:
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}, staging / name
        )
    (staging / BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
    ckpt.publish(staging, folder)


def load_adapter(folder: Path) -> tuple[VisionLanguageModel, PeftModel]:
    """The base VLM of an adapter folder with the adapter applied (not merged) and the trained projector."""
    folder = _adapter_folder(folder)
    base = json.loads((folder / BASE_FILE).read_text())
    paths = {k: Path(base[k]) if base.get(k) else None for k in ("model_dir", "vision_dir", "decoder_dir")}
    vlm = starting_vlm(
        paths["model_dir"],
        paths["vision_dir"],
        paths["decoder_dir"],
        base["projector"],
        base["select_layer"],
        qformer=QFormerSize(**base["qformer"]) if "qformer" in base else None,
    )
    vlm.projector.load_state_dict(load_file(folder / PROJECTOR_FILE))
    if (folder / TOWER_FILE).is_file():
        vlm.vision_tower.load_state_dict(load_file(folder / TOWER_FILE))
    return vlm, PeftModel.from_pretrained(vlm.language_model, folder)


def merged(vlm: VisionLanguageModel, peft_model: PeftModel) -> VisionLanguageModel:
    """``vlm`` with the LoRA update folded into its language model's weights (a plain decoder again)."""
    vlm.language_model = peft_model.merge_and_unload()
    return vlm


def _adapter_folder(path: Path) -> Path:
    """An adapter folder, or a run folder holding one."""
    for folder in (Path(path), Path(path) / ADAPTER_DIR):
        if (folder / BASE_FILE).is_file():
            return folder
    raise MmwbCheckpointError(f"{path}: not an instruct run or adapter folder (no {BASE_FILE})")


def load_projector(projector: nn.Module, source: Path) -> None:
    """Projector weights from an align checkpoint folder (``projector.*`` keys) or the run folder holding them."""
    source = Path(source)
    if (source / "checkpoints").is_dir():
        source = ckpt.find_checkpoint(source / "checkpoints", "latest")
    weights = load_file(source / ckpt.MODEL_FILE)
    state = {k.removeprefix("projector."): v for k, v in weights.items() if k.startswith("projector.")}
    if not state:
        raise MmwbCheckpointError(f"{source / ckpt.MODEL_FILE}: holds no projector.* tensors")
    projector.load_state_dict(state)


def run_instruct_stage(config: InstructConfig) -> dict[str, Any]:
    """A recipe's VLM stage: train (LoRA or whole), merge, evaluate captions and VQA on the test split, and
    save the metrics beside the merged model."""
    started = time.perf_counter()
    result, adapter = train_instruct(config)
    metrics = {
        "stage": "instruct",
        "steps": result.step,
        "last_loss": result.last_loss,
        "adapter": str(adapter) if adapter is not None else None,
    }
    metrics |= evaluate_saved(Path(config.out_dir), config.data_dir, config.evaluation, vqa=True)
    metrics["seconds"] = time.perf_counter() - started
    write_metrics(metrics, Path(config.out_dir))
    return metrics
