"""mmwb: a multimodal model workbench.

Vision-language models with a Mixture-of-Experts decoder, ControlNet-conditioned Stable Diffusion and
score-based SDE models, all on one runtime (device, precision, seeding, timing) and one training engine.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def from_pretrained(path, device=None, dtype=None, quantize=None, group_size=64) -> Any:
    """Load any checkpoint folder mmwb understands (a decoder or a VLM), its linear layers and experts in int8 or
    int4 with ``quantize``; see mmwb.models.loading and mmwb.models.quantize."""
    from mmwb.models.loading import from_pretrained as load  # lazy: `import mmwb` stays light

    return load(path, device=device, dtype=dtype, quantize=quantize, group_size=group_size)
