"""Fixtures: the real tokenizer files, small checkpoints in the published format.

The real tokenizer files (`spiece.model` and the JSON files beside it) are looked for in
this order: the folder named by `REPLIT_FT_TOKENIZER`, `../shared/replit-code-v1-3b/`
beside the project, and the hub cache's snapshot of replit/replit-code-v1-3b. The first
line of the run says which one was used, or that none was found and how many tests that
skips.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from model.random_checkpoint import write_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "replit-code-v1-3b"

warnings.filterwarnings("ignore", message=".*flex_attention.*")


def tokenizer_candidates() -> list[tuple[str, Path]]:
    """Where the real tokenizer files may be, in the order they are tried."""
    found = []
    if os.environ.get("REPLIT_FT_TOKENIZER"):
        found.append(("REPLIT_FT_TOKENIZER", Path(os.environ["REPLIT_FT_TOKENIZER"])))
    found.append(("../shared beside the project", SHARED))
    from huggingface_hub.constants import HF_HUB_CACHE

    snapshots = Path(HF_HUB_CACHE) / "models--replit--replit-code-v1-3b" / "snapshots"
    found += [("the hub cache", p) for p in sorted(snapshots.glob("*"))]
    return found


def find_real_tokenizer() -> tuple[str, Path] | None:
    return next(
        ((how, p) for how, p in tokenizer_candidates() if (p / "spiece.model").is_file()), None
    )


REAL_TOKENIZER = find_real_tokenizer()


def pytest_collection_modifyitems(config, items):
    """Say at the top of the run where the tokenizer came from, or how many tests lack it."""
    needing = [item for item in items if "real_tokenizer_dir" in getattr(item, "fixturenames", ())]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if REAL_TOKENIZER is not None:
        line = f"real tokenizer: {REAL_TOKENIZER[1]} (from {REAL_TOKENIZER[0]})"
    else:
        looked = ", ".join(str(p) for _, p in tokenizer_candidates())
        line = (
            f"real tokenizer files NOT FOUND (looked in {looked}): {len(needing)} of "
            f"{len(items)} tests are skipped; set REPLIT_FT_TOKENIZER=DIR (a folder with "
            "replit-code-v1-3b's spiece.model) to run them"
        )
        for item in needing:
            item.add_marker(pytest.mark.skip(reason="the real tokenizer files are missing"))
    if reporter is not None:
        reporter.write_line(line)


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> Path:
    if REAL_TOKENIZER is None:
        pytest.skip("the real tokenizer files are missing")
    return REAL_TOKENIZER[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, real_tokenizer_dir) -> Path:
    """2 layers, d_model 192, 6 heads (not a power of two: the other ALiBi slope branch)."""
    path = tmp_path_factory.mktemp("tiny")
    return write_checkpoint(
        path, n_layers=2, d_model=192, n_heads=6, tokenizer=real_tokenizer_dir, seed=1
    )


@pytest.fixture(scope="session")
def base(tmp_path_factory, real_tokenizer_dir) -> Path:
    """2 layers, d_model 64, 4 heads, std 0.1 (weights large enough for LoRA to show): the
    base that training, merge and export tests adapt. Read only."""
    path = tmp_path_factory.mktemp("base")
    return write_checkpoint(
        path, n_layers=2, d_model=64, n_heads=4, tokenizer=real_tokenizer_dir, std=0.1
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def generate_calls(monkeypatch):
    """`generate_calls(fail_at=None)` counts the calls of finetune.generate.generate from then on
    (the list it returns gets each call's number of prompts: one call per batch in an eval) and
    raises RuntimeError("interrupted ...") at call number `fail_at`, where a kill would stop it."""
    import finetune.generate

    real = finetune.generate.generate

    def count(fail_at: int | None = None) -> list[int]:
        calls: list[int] = []

        def counted(model, tokenizer, prompts, **options):
            calls.append(len(prompts))
            if len(calls) == fail_at:
                raise RuntimeError(f"interrupted at batch {fail_at}")
            return real(model, tokenizer, prompts, **options)

        monkeypatch.setattr(finetune.generate, "generate", counted)
        return calls

    return count
