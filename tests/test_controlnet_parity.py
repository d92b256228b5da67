"""mmwb's ControlNet generation equals diffusers' StableDiffusionControlNetPipeline on the same tiny random weights."""

import logging

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image

from mmwb.errors import MmwbDeviceError
from mmwb.models.diffusion.memory import MemorySavers
from mmwb.models.diffusion.schedulers import SCHEDULERS, make_scheduler
from mmwb.pipelines.controlnet import ControlNetGenerator, GenerationParams
from mmwb.testing.tiny_sd import save_tiny_controlnet_sd

SIZE = 32
STEPS = 3
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_controlnet_sd(tmp_path_factory.mktemp("tiny_sd"), n_controlnets=2)


@pytest.fixture(scope="module")
def mmwb_one(tiny):
    model, controlnets = tiny
    return ControlNetGenerator.from_pretrained(model, controlnets[:1], device="cpu")


@pytest.fixture(scope="module")
def mmwb_two(tiny):
    model, controlnets = tiny
    return ControlNetGenerator.from_pretrained(model, controlnets, device="cpu")


def reference(tiny, n_controlnets, scheduler_cls, **scheduler_kwargs):
    model, controlnets = tiny
    nets = [ControlNetModel.from_pretrained(path) for path in controlnets[:n_controlnets]]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        model, controlnet=nets[0] if len(nets) == 1 else nets
    )
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **scheduler_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(seed, size=SIZE):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def run_mmwb(generator, images, **params):
    params = GenerationParams(prompt="a red square", width=SIZE, height=SIZE, steps=STEPS, seed=7, **params)
    return generator.generate(params, control_images=images, progress=False, output_type="np")


def run_reference(pipe, image, **kwargs):
    kwargs = {"height": SIZE, "width": SIZE, "num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return pipe("a red square", image=image, generator=torch.Generator().manual_seed(7), **kwargs).images


def test_one_controlnet_matches_diffusers(tiny, mmwb_one):
    image = random_image(0)
    ours = run_mmwb(mmwb_one, [image])
    theirs = run_reference(reference(tiny, 1, DDIMScheduler), image)
    assert ours.images.shape == (1, SIZE, SIZE, 3)
    assert np.abs(ours.images - theirs).max() <= TOLERANCE


def test_controlnet_changes_the_image(mmwb_one):
    """Guards the parity tests: they would pass vacuously if the ControlNet added nothing."""
    first = run_mmwb(mmwb_one, [random_image(0)]).images
    second = run_mmwb(mmwb_one, [random_image(1)]).images
    assert np.abs(first - second).max() > 1e-3


def test_guess_mode_and_guidance_window_match_diffusers(tiny, mmwb_one):
    image = random_image(2)
    options = {"cn_scale": [0.7], "guidance_start": [0.2], "guidance_end": [0.8], "guess_mode": True}
    ours = run_mmwb(mmwb_one, [image], scheduler="dpmpp_2m_karras", num_images=2, **options)
    pipe = reference(
        tiny, 1, DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", use_karras_sigmas=True
    )
    theirs = run_reference(
        pipe,
        image,
        controlnet_conditioning_scale=0.7,
        control_guidance_start=0.2,
        control_guidance_end=0.8,
        guess_mode=True,
        num_images_per_prompt=2,
    )
    assert ours.images.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours.images - theirs).max() <= TOLERANCE


def test_two_controlnets_match_diffusers(tiny, mmwb_two):
    images = [random_image(3), random_image(4)]
    options = {
        "cn_scale": [0.5, 1.5],
        "guidance_start": [0.0, 0.3],
        "guidance_end": [0.9, 1.0],
        "guess_mode": True,
    }
    ours = run_mmwb(mmwb_two, images, scheduler="euler_a", preprocess=["canny", "none"], **options)
    theirs = run_reference(
        reference(tiny, 2, EulerAncestralDiscreteScheduler),
        ours.conditions,  # canny edges of images[0], images[1] as it is
        controlnet_conditioning_scale=[0.5, 1.5],
        control_guidance_start=[0.0, 0.3],
        control_guidance_end=[0.9, 1.0],
        guess_mode=True,
    )
    assert np.array_equal(np.asarray(ours.conditions[1]), np.asarray(images[1]))
    assert np.abs(ours.images - theirs).max() <= TOLERANCE


def test_seeded_runs_repeat_and_differ_by_seed(mmwb_one):
    image = random_image(5)
    first = run_mmwb(mmwb_one, [image], scheduler="euler_a").images
    again = run_mmwb(mmwb_one, [image], scheduler="euler_a").images
    other = mmwb_one.generate(
        GenerationParams(
            prompt="a red square", width=SIZE, height=SIZE, steps=STEPS, seed=8, scheduler="euler_a"
        ),
        control_images=[image],
        progress=False,
        output_type="np",
    ).images
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_name_builds_on_the_model_schedule(mmwb_one, name):
    base = dict(mmwb_one.pipe.scheduler.config)
    scheduler = make_scheduler(name, base)
    class_name, overrides = SCHEDULERS[name]
    assert type(scheduler).__name__ == class_name
    assert scheduler.config.beta_schedule == base["beta_schedule"] == "scaled_linear"
    assert all(scheduler.config[key] == value for key, value in overrides.items())
    scheduler.set_timesteps(STEPS)
    assert len(scheduler.timesteps) >= STEPS


def test_long_prompt_is_truncated_with_a_warning(mmwb_one, caplog):
    long_prompt = (
        "a " * 100
    )  # the tiny tokenizer spends one token per one-letter word: 100 + 2 special tokens
    with caplog.at_level(logging.WARNING, logger="mmwb"):
        long = run_mmwb(mmwb_one, [random_image(6)], negative_prompt=long_prompt).images
    dropped = " ".join(["a"] * 25)
    assert [record.getMessage() for record in caplog.records if record.name.startswith("mmwb")] == [
        f"negative prompt is 102 tokens but the text encoder reads 77; this end is ignored: {dropped!r}"
    ]  # and nothing about the short prompt
    short = run_mmwb(mmwb_one, [random_image(6)], negative_prompt="a " * 75).images
    assert np.abs(long - short).max() <= TOLERANCE  # the words past the limit really are ignored


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m"])
def test_sd2_layout_with_v_prediction_matches_diffusers(tmp_path_factory, scheduler):
    model, controlnets = save_tiny_controlnet_sd(
        tmp_path_factory.mktemp("sd2"), n_controlnets=1, layout="sd2"
    )
    generator = ControlNetGenerator.from_pretrained(model, controlnets, device="cpu")
    assert generator.pipe.unet.config.upcast_attention and generator.pipe.unet.config.use_linear_projection
    image = random_image(8)
    ours = run_mmwb(generator, [image], scheduler=scheduler)
    pipe = reference((model, controlnets), 1, DDIMScheduler)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # switching scheduler keeps v-prediction
    theirs = run_reference(pipe, image)
    assert np.abs(ours.images - theirs).max() <= TOLERANCE


def test_sdxl_controlnet_matches_diffusers(tmp_path):
    model, controlnets = save_tiny_controlnet_sd(tmp_path, n_controlnets=1, layout="sdxl")
    generator = ControlNetGenerator.from_pretrained(model, controlnets, device="cpu")
    assert isinstance(generator.pipe, StableDiffusionXLControlNetPipeline)
    image = random_image(7)
    ours = run_mmwb(generator, [image], guess_mode=True, guidance_start=[0.1], guidance_end=[0.9])
    assert ours.params.guidance_scale == 5.0  # SDXL's own default, recorded for the rerun
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        model, controlnet=ControlNetModel.from_pretrained(controlnets[0])
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = run_reference(pipe, image, guess_mode=True, control_guidance_start=0.1, control_guidance_end=0.9)
    assert np.abs(ours.images - theirs).max() <= TOLERANCE


def test_memory_savers_are_switched_on_and_keep_the_result(tiny, mmwb_one):
    model, controlnets = tiny
    savers = MemorySavers(attention_slicing=True, vae_slicing=True, vae_tiling=True, channels_last=True)
    saving = ControlNetGenerator.from_pretrained(model, controlnets[:1], device="cpu", memory=savers)
    conv = saving.pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert saving.pipe.vae.use_slicing and saving.pipe.vae.use_tiling
    assert any(type(p).__name__ == "SlicedAttnProcessor" for p in saving.pipe.unet.attn_processors.values())
    assert saving.runtime.memory == savers
    image = random_image(8)
    assert np.abs(run_mmwb(saving, [image]).images - run_mmwb(mmwb_one, [image]).images).max() <= 1e-4
    with pytest.raises(MmwbDeviceError, match="--cpu-offload needs an accelerator"):
        ControlNetGenerator.from_pretrained(
            model, controlnets[:1], device="cpu", memory=MemorySavers(cpu_offload=True)
        )
