"""Fixtures: the real tokenizer files from ../shared, small checkpoints in the published format."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from model.testing import write_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "replit-code-v1-3b"

warnings.filterwarnings("ignore", message=".*flex_attention.*")


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> Path:
    if not (SHARED / "spiece.model").is_file():
        pytest.skip(f"{SHARED} (the real tokenizer files) is not beside the project")
    return SHARED


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, real_tokenizer_dir) -> Path:
    """2 layers, d_model 192, 6 heads (not a power of two: the other ALiBi slope branch)."""
    path = tmp_path_factory.mktemp("tiny")
    return write_checkpoint(
        path, n_layers=2, d_model=192, n_heads=6, tokenizer=real_tokenizer_dir, seed=1
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
