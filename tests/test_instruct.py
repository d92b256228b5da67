"""Stage 2: LoRA (attention, shared and routed experts) + projector train, nothing else; merging the adapter gives
the logits of the unmerged adapter; ``mmwb export --merge-lora`` writes a model that loads without peft."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmwb
from mmwb.cli.main import main
from mmwb.data.captions import read_records
from mmwb.models.vlm.prompt import make_encoder
from mmwb.train.image_features import FeatureCacheConfig, ProcessedPixels, batch_features
from mmwb.train.instruct import InstructConfig, load_adapter, merged, train_instruct
from mmwb.train.multimodal import collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_train_fixtures import make_setup, tiny_train  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step instruct run on tiny random parts."""
    root = tmp_path_factory.mktemp("instruct")
    setup = make_setup(root, n=16)
    config = InstructConfig(
        data_dir=setup["data"],
        vision_dir=setup["vision"],
        decoder_dir=setup["decoder"],
        max_length=48,
        out_dir=root / "merged",
        feature_cache=FeatureCacheConfig(root=root / "cache"),
        train=tiny_train(root / "run", max_steps=2),
    )
    config.lora.r = 4
    result, adapter = train_instruct(config)
    return {"setup": setup, "config": config, "result": result, "adapter": adapter, "root": root}


def _batch(vlm, setup, n=4):
    records = read_records(setup["data"] / "val.jsonl", prefer="qa")[:n]
    encode, load = make_encoder(vlm.tokenizer, "chat", 48), ProcessedPixels(vlm.image_processor())
    return collate(
        [{**load(setup["data"] / r.image), **encode(r)} for r in records], vlm.tokenizer.pad_token_id
    )


@torch.no_grad()
def _logits(vlm, batch):
    return vlm(
        batch["input_ids"], attention_mask=batch["attention_mask"], vision_features=batch_features(vlm, batch)
    ).logits


@pytest.mark.slow
def test_checkpoints_hold_only_lora_factors_and_the_projector(run):
    saved = load_file(run["result"].checkpoint / "model.safetensors")
    assert saved and all(k.startswith("projector.") or ".lora_" in k for k in saved)
    names = {k.split(".lora_")[0].split("base_model.model.")[-1] for k in saved if ".lora_" in k}
    for wanted in ("self_attn.q_proj", "self_attn.o_proj", "mlp.shared_experts.down_proj", "mlp.experts"):
        assert any(name.endswith(wanted) or wanted + ".base_layer" in name for name in names), wanted
    assert not any("mlp.gate." in name for name in names)  # the router stays frozen
    assert any(k.startswith("projector.") for k in saved)


@pytest.mark.slow
def test_merged_lora_gives_the_logits_of_the_unmerged_adapter(run):
    vlm, peft_model = load_adapter(run["adapter"])
    torch.manual_seed(0)
    with torch.no_grad():  # make every adapter matter: trained B factors are still close to zero
        for name, param in vlm.language_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    batch = _batch(vlm, run["setup"])
    with peft_model.disable_adapter():
        without = _logits(vlm, batch)
    unmerged = _logits(vlm, batch)
    assert (unmerged - without).abs().max() > 1e-2  # the adapters (experts included) change the output
    merged_vlm = merged(vlm, peft_model)
    assert not any("lora" in name for name, _ in merged_vlm.named_parameters())
    torch.testing.assert_close(_logits(merged_vlm, batch), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_export_merges_into_a_folder_that_loads_without_peft(run):
    out = run["root"] / "exported"
    assert (
        main(["export", "--merge-lora", "--model", str(run["config"].train.out_dir), "--out", str(out)]) == 0
    )
    exported = mmwb.from_pretrained(out)
    assert not any("lora" in name for name, _ in exported.named_parameters())
    vlm, _ = load_adapter(run["adapter"])
    batch = _batch(exported, run["setup"])
    torch.testing.assert_close(_logits(exported, batch), _logits(vlm, batch), atol=1e-5, rtol=1e-5)
    final = mmwb.from_pretrained(run["config"].out_dir)  # the merged model the run wrote itself
    torch.testing.assert_close(_logits(final, batch), _logits(exported, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_new_conv_tower_and_the_whole_decoder_train_together(tmp_path):
    """Full fine-tuning (lora: null) with a convolutional tower built fresh from its spec: tower, projector and
    every decoder weight train, BatchNorm statistics are checkpointed for resume, and the saved VLM reloads with
    the same logits."""
    setup = make_setup(tmp_path, n=16)
    tower = {"type": "conv", "config": {"image_size": 32, "channels": [8, 16], "strides": [2, 2]}}
    config = InstructConfig(
        data_dir=setup["data"], decoder_dir=setup["decoder"], tower=tower, lora=None, max_length=48,
        out_dir=tmp_path / "model", train=tiny_train(tmp_path / "run", max_steps=2),
    )  # fmt: skip
    result, adapter = train_instruct(config)
    assert adapter is None and result.step == 2
    saved = load_file(result.checkpoint / "model.safetensors")
    start = {k: v for k, v in mmwb.from_pretrained(setup["decoder"], device="cpu").named_parameters()}
    moved = [k for k, v in start.items() if not torch.equal(v, saved[f"language_model.{k}"])]
    assert len(moved) == len(start)  # every decoder weight trained (not a LoRA factor in sight)
    assert not any(".lora_" in k for k in saved)
    assert "vision_tower.stages.0.1.running_mean" in saved and "vision_tower.row_embed" in saved
    assert any(k.startswith("projector.") for k in saved)
    vlm = mmwb.from_pretrained(tmp_path / "model", device="cpu")
    assert vlm.config.vision["type"] == "conv" and vlm.config.vision["config"]["channels"] == [8, 16]
    trained = {k.removeprefix("vision_tower."): v for k, v in saved.items() if k.startswith("vision_tower.")}
    for name, tensor in vlm.vision_tower.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert not torch.equal(trained["stages.0.1.running_mean"], torch.zeros(8))  # the statistics moved
    batch = _batch(vlm, setup)
    again = mmwb.from_pretrained(tmp_path / "model", device="cpu")
    assert torch.equal(_logits(vlm.eval(), batch), _logits(again.eval(), batch))


@pytest.mark.slow
def test_the_cell_loss_trains_a_head_that_the_saved_vlm_leaves_out(tmp_path):
    """cell_loss: the run's checkpoints hold the auxiliary head (a resume needs it), the saved VLM does not, and the
    head's loss is what the training module adds to the language loss."""
    setup = make_setup(tmp_path, n=16)
    tower = {"type": "conv", "config": {"image_size": 32, "channels": [8, 16], "strides": [2, 2]}}
    config = InstructConfig(
        data_dir=setup["data"], decoder_dir=setup["decoder"], tower=tower, lora=None, max_length=48,
        question_draws=2, question_weights={"position": 4.0}, cell_loss=0.5,
        out_dir=tmp_path / "model", train=tiny_train(tmp_path / "run", max_steps=2),
    )  # fmt: skip
    result, _ = train_instruct(config)
    saved = load_file(result.checkpoint / "model.safetensors")
    assert saved["cell_head.linear.weight"].shape == (7 + 5 + 3, 16)
    vlm = mmwb.from_pretrained(tmp_path / "model", device="cpu")
    assert not any("cell_head" in k for k in vlm.state_dict())


def test_cell_loss_settings_that_cannot_work_are_config_errors(tmp_path):
    from mmwb.errors import MmwbConfigError

    setup = make_setup(tmp_path, n=16)
    frozen = InstructConfig(data_dir=setup["data"], vision_dir=setup["vision"], decoder_dir=setup["decoder"],
                            cell_loss=1.0, train=tiny_train(tmp_path / "run"))  # fmt: skip
    with pytest.raises(MmwbConfigError, match="cell_loss trains the vision tower"):
        train_instruct(frozen)
    with pytest.raises(MmwbConfigError, match="set question_draws too"):
        train_instruct(InstructConfig(question_weights={"position": 2.0}))
    with pytest.raises(MmwbConfigError, match="questions_per_record .* set question_draws too"):
        train_instruct(InstructConfig(questions_per_record=4))


def test_records_chosen_two_ways_is_a_config_error():
    from mmwb.errors import MmwbConfigError

    with pytest.raises(MmwbConfigError, match="single_turn and question_draws"):
        train_instruct(InstructConfig(single_turn=True, question_draws=3))
