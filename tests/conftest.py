"""Shared fixtures: offline environment, tiny model folder, GSM8K fixture rows."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _signal_handlers():
    """Every test starts and ends with the same SIGINT / SIGTERM handlers (a trainer stopped
    under the launcher ignores them until its process exits: not the test process)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def lm():
    """A tiny random llama-shaped model in eval mode and its tokenizer."""
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny.write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory) -> Path:
    return tiny.write_gsm8k(tmp_path_factory.mktemp("gsm8k"))
