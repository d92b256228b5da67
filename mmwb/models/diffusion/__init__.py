"""Stable Diffusion with ControlNets on diffusers: local-only loading, schedulers, memory savers.

diffusers owns the models and the sampling loop; mmwb adds what sits around them (loading checks,
scheduler names, memory savers). Import the submodules directly; this package imports nothing heavy itself.
"""
