"""--bf16-autocast: bf16 where the hardware has bf16 matmul units, fp32 (with a warning) on a CPU without them."""

import logging

import pytest
import torch

import training.saes
from training.config import make_config
from training.saes import step_autocast_dtype


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_follows_the_hardware(monkeypatch, caplog, native):
    monkeypatch.setattr(training.saes, "has_native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert step_autocast_dtype(make_config({}), cpu) is None  # off by default, whatever the hardware
    with caplog.at_level(logging.WARNING, logger="training"):
        dtype = step_autocast_dtype(make_config({"bf16_autocast": True}), cpu)
    assert dtype == (torch.bfloat16 if native else None)
    assert ("no bf16 matrix units" in caplog.text) is not native


def test_bf16_autocast_is_kept_on_accelerators(monkeypatch):
    monkeypatch.setattr(training.saes, "has_native_bf16", lambda device: False)  # only CPUs fall back
    assert step_autocast_dtype(make_config({"bf16_autocast": True}), torch.device("cuda")) == torch.bfloat16
