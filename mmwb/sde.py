"""``mmwb.sde``: the public face of mmwb's score-based SDE models (re-exports ``mmwb.models.sde``)."""

from mmwb.models.sde import *  # noqa: F403
from mmwb.models.sde import __all__  # noqa: F401
