"""Test-wide settings: nothing may reach a hub, and every test starts from the same seeds."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from mmwb.runtime import seed_everything  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    seed_everything(0)
    yield


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
