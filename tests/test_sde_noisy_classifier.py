"""The noisy digit classifier: training round trip, its folder format, and that it only guides a matching model."""

import dataclasses
import json

import pytest

from mmwb.errors import MmwbCheckpointError, MmwbInputError
from mmwb.models.sde.noisy_classifier import (
    NoisyClassifierSpec,
    build_noisy_classifier,
    check_compatible,
    load_noisy_classifier,
    save_noisy_classifier,
)
from mmwb.models.sde.trained import SDESpec
from mmwb.pipelines.sde import DIGITS_MODEL, DIGITS_NOISY_CLASSIFIER, load_trained
from mmwb.train.config import TrainConfig
from mmwb.train.noisy_classifier import (
    REPORT_TIMES,
    NoisyClassifierConfig,
    noisy_accuracy,
    train_noisy_classifier,
)

TINY = NoisyClassifierSpec(hidden=16, depth=1, embed_dim=8)


def test_training_writes_a_folder_that_loads_back(tmp_path):
    train = TrainConfig(out_dir=tmp_path / "run", max_steps=30, batch_size=64, lr=3e-3, progress=False)
    accuracy = train_noisy_classifier(NoisyClassifierConfig(TINY, train), tmp_path / "clf")
    assert list(accuracy) == [f"t={t:g}" for t in REPORT_TIMES]
    assert accuracy["t=0"] > 0.3  # 30 steps already beat chance (0.1) on clean digits
    classifier, spec = load_noisy_classifier(tmp_path / "clf")
    assert spec == TINY and not classifier.training
    assert noisy_accuracy(classifier, spec, [0.0]) == {"t=0": accuracy["t=0"]}  # same seed, same noise
    recorded = json.loads((tmp_path / "clf" / "config.json").read_text())["info"]
    assert recorded["steps"] == 30 and recorded["test_accuracy"] == accuracy


def test_broken_folders_name_the_problem(tmp_path):
    with pytest.raises(MmwbCheckpointError, match="not a noisy digit classifier folder"):
        load_noisy_classifier(tmp_path)
    save_noisy_classifier(build_noisy_classifier(TINY), TINY, tmp_path, {})
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"hidden": 32}))
    with pytest.raises(MmwbCheckpointError, match="weights do not fit config.json"):
        load_noisy_classifier(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"format": "mmwb-sde"}))
    with pytest.raises(MmwbCheckpointError, match="format is not 'mmwb-noisy-digit-classifier'"):
        load_noisy_classifier(tmp_path)


def test_a_classifier_of_another_sde_is_refused():
    trained = load_trained(DIGITS_MODEL)
    check_compatible(dataclasses.replace(TINY, sde=trained.spec.sde, data=trained.spec.data), trained)
    other = dataclasses.replace(TINY, sde=SDESpec(beta_max=10.0), data=trained.spec.data)
    with pytest.raises(
        MmwbInputError, match=r"trained for sde.beta_max=10.0 but the score model has sde.beta_max=20.0"
    ):
        check_compatible(other, trained)


def test_shipped_classifier_reads_clean_and_lightly_noised_digits():
    classifier, spec = load_noisy_classifier(DIGITS_NOISY_CLASSIFIER)
    check_compatible(spec, load_trained(DIGITS_MODEL))
    accuracy = noisy_accuracy(classifier, spec, [0.0, 0.1, 0.8])
    assert accuracy["t=0"] >= 0.97 and accuracy["t=0.1"] >= 0.95
    assert accuracy["t=0.8"] < 0.3  # near the prior nothing is left to read
