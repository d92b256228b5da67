"""mmwb: a multimodal model workbench.

Vision-language models with a Mixture-of-Experts decoder, ControlNet-conditioned Stable Diffusion and
score-based SDE models, all on one runtime (device, precision, seeding, timing) and one training engine.
"""

__version__ = "0.1.0"
