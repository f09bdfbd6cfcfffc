"""A checkpoint resumes on a machine with another thread count, never with settings that change training."""

from pathlib import Path

import pytest
import yaml

from moe_adapters.checkpoint import resume_identity
from moe_adapters.config_load import load_mixture

MIXTURE = Path(__file__).parent / "fixtures" / "mixture.yaml"
PROBABILITIES = {"sentiment": 0.5, "arithmetic": 0.5}


def _identity(*overrides: str, single_adapter: bool = False) -> str:
    pairs = (o.split("=", 1) for o in overrides)
    config = load_mixture(MIXTURE, {key: yaml.safe_load(value) for key, value in pairs})
    return resume_identity(config, PROBABILITIES, single_adapter)


def test_thread_count_does_not_change_the_identity():
    assert _identity() == _identity("train.num_threads=1") == _identity("train.num_threads=2")


@pytest.mark.parametrize("override", ["train.lr=0.01", "train.max_steps=7", "lora.r=4", "train.seed=99"])
def test_settings_that_change_training_do(override):
    assert _identity(override) != _identity()


def test_single_adapter_mode_is_part_of_it():
    assert _identity(single_adapter=True) != _identity()
