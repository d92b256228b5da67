"""Local-only loading of SD + ControlNets: every missing or mismatched part is named before diffusers runs."""

import json
import shutil

import pytest
import torch
from diffusers import ControlNetModel, MultiControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

from mmwb.errors import MmwbCheckpointError
from mmwb.models.diffusion.loading import load_controlnet, load_controlnet_pipeline
from mmwb.testing.tiny_sd import save_tiny_controlnet_sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_controlnet_sd(tmp_path_factory.mktemp("tiny_load"), n_controlnets=2)


@pytest.fixture
def model_copy(tiny, tmp_path):
    return shutil.copytree(tiny[0], tmp_path / "sd")


def test_two_controlnets_become_a_multi_controlnet(tiny):
    model, controlnets = tiny
    pipe = load_controlnet_pipeline(model, controlnets)
    assert isinstance(pipe.controlnet, MultiControlNetModel) and len(pipe.controlnet.nets) == 2
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    bf16 = load_controlnet_pipeline(model, controlnets[:1], dtype=torch.bfloat16)
    assert isinstance(bf16.controlnet, ControlNetModel) and bf16.unet.dtype == torch.bfloat16


def test_missing_model_part_is_named(tiny, model_copy):
    shutil.rmtree(model_copy / "unet")
    with pytest.raises(MmwbCheckpointError, match=r"sd/unet: model part 'unet' is missing"):
        load_controlnet_pipeline(model_copy, tiny[1][:1])


def test_missing_weights_are_named(tiny, model_copy):
    (model_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MmwbCheckpointError, match=r"sd/vae: model part 'vae' has no .safetensors weights"):
        load_controlnet_pipeline(model_copy, tiny[1][:1])


def test_part_not_listed_in_the_index_is_named(tiny, model_copy):
    index = json.loads((model_copy / "model_index.json").read_text())
    del index["text_encoder"]
    (model_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        MmwbCheckpointError, match="model part 'text_encoder' is not listed in model_index.json"
    ):
        load_controlnet_pipeline(model_copy, tiny[1][:1])


def test_unsupported_pipeline_and_non_pipeline_folders(tiny, model_copy):
    index = json.loads((model_copy / "model_index.json").read_text())
    (model_copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(MmwbCheckpointError, match="describes a 'FluxPipeline'; mmwb runs ControlNets on"):
        load_controlnet_pipeline(model_copy, tiny[1][:1])
    with pytest.raises(MmwbCheckpointError, match="no model_index.json"):
        load_controlnet_pipeline(model_copy / "unet", tiny[1][:1])


def test_controlnet_problems_are_named(tiny, tmp_path):
    model, controlnets = tiny
    with pytest.raises(MmwbCheckpointError, match="at least one ControlNet is needed"):
        load_controlnet_pipeline(model, [])
    broken = shutil.copytree(controlnets[0], tmp_path / "cn")
    (broken / "config.json").unlink()
    with pytest.raises(MmwbCheckpointError, match=r"cn: ControlNet has no config.json"):
        load_controlnet(broken)
    with pytest.raises(MmwbCheckpointError, match="nothing: ControlNet not found"):
        load_controlnet(tmp_path / "nothing")
    (tmp_path / "cn.ckpt").write_bytes(b"pickle")
    with pytest.raises(MmwbCheckpointError, match="must be a .safetensors file"):
        load_controlnet(tmp_path / "cn.ckpt")


def test_controlnet_for_another_base_model_is_refused(tiny, tmp_path):
    other_unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,  # like an SD 2.x ControlNet (1024) offered to an SD 1.x model (768)
        attention_head_dim=4,
    )
    ControlNetModel.from_unet(other_unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(
        tmp_path / "cn"
    )
    with pytest.raises(MmwbCheckpointError, match="cross_attention_dim=48 but the model .* has 32"):
        load_controlnet_pipeline(tiny[0], [tmp_path / "cn"])


def test_single_file_without_configs_asks_for_config(tiny, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, checkpoint)
    with pytest.raises(MmwbCheckpointError, match="not in the local Hugging Face cache: pass --config DIR"):
        load_controlnet_pipeline(checkpoint, tiny[1][:1])
    with pytest.raises(MmwbCheckpointError, match="config folder not found"):
        load_controlnet_pipeline(checkpoint, tiny[1][:1], config=tmp_path / "missing")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(MmwbCheckpointError, match="single-file model must be a .safetensors file"):
        load_controlnet_pipeline(tmp_path / "model.ckpt", tiny[1][:1])


def test_single_file_controlnet_takes_the_config_beside_it(tiny, tmp_path):
    folder = tiny[1][0]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path / "canny.safetensors")
    shutil.copy(tmp_path / "canny.safetensors", tmp_path / "alone.safetensors")
    (tmp_path / "config.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(
        MmwbCheckpointError, match="not in the local Hugging Face cache: put its config.json in"
    ):
        load_controlnet(tmp_path / "alone.safetensors")
    (tmp_path / "elsewhere.json").rename(tmp_path / "config.json")
    single = load_controlnet(tmp_path / "canny.safetensors")
    reference = ControlNetModel.from_pretrained(folder)
    for (name, ours), (_, theirs) in zip(
        single.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name
