"""Score-based generative models through SDEs (Song et al. 2021): SDEs, samplers, likelihoods, losses, guidance.

Everything here is torch and scipy only and works for samples of any rank. The score networks (diffusers'
UNet2DModel and an MLP) live in ``mmwb.models.sde.networks``, imported directly so that this package stays light.
"""

from mmwb.models.sde.gaussian import GaussianMixture
from mmwb.models.sde.guidance import classifier_guided_score, colourise, conditional_sample, inpaint
from mmwb.models.sde.likelihood import (
    LikelihoodOutput,
    bits_per_dim,
    dequantize,
    log_likelihood,
    probability_flow_likelihood,
)
from mmwb.models.sde.losses import classifier_loss, dsm_loss, importance_times
from mmwb.models.sde.metrics import sliced_wasserstein
from mmwb.models.sde.samplers import (
    PREDICTORS,
    SAMPLERS,
    SCHEDULES,
    SampleOutput,
    ancestral,
    euler_maruyama,
    heun,
    karras_times,
    langevin_step,
    ode,
    ode_torch,
    pc,
    probability_flow,
    reverse_diffusion,
    sample,
    tweedie_denoise,
    uniform_times,
)
from mmwb.models.sde.sdes import SDE, VESDE, VPSDE, ReverseSDE, ScoreFn, SubVPSDE, append_dims

__all__ = [
    "PREDICTORS",
    "SAMPLERS",
    "SCHEDULES",
    "SDE",
    "VESDE",
    "VPSDE",
    "GaussianMixture",
    "LikelihoodOutput",
    "ReverseSDE",
    "SampleOutput",
    "ScoreFn",
    "SubVPSDE",
    "ancestral",
    "append_dims",
    "bits_per_dim",
    "classifier_guided_score",
    "classifier_loss",
    "colourise",
    "conditional_sample",
    "dequantize",
    "dsm_loss",
    "euler_maruyama",
    "heun",
    "importance_times",
    "inpaint",
    "karras_times",
    "langevin_step",
    "log_likelihood",
    "ode",
    "ode_torch",
    "pc",
    "probability_flow",
    "probability_flow_likelihood",
    "reverse_diffusion",
    "sample",
    "sliced_wasserstein",
    "tweedie_denoise",
    "uniform_times",
]
