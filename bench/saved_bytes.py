"""What a QLoRA step keeps for backward, per token and block, at full width: each lever of
bench/levers.py against the kit's step, and transformers' MPT + peft + bnb beside them.

Counted, not timed, so a CPU answers it: every tensor autograd saves during one forward
pass under bf16 autocast (a `saved_tensors_hooks` pack hook, each storage once), on a
model of replit-code-v1-3b's width (d_model 2560, 32 heads, vocab 32768) over one
row of `--length` tokens, with checkpointing on (as the recipes train) and off. Saved
L x L tensors (attention probabilities: the CPU's sdpa and transformers' eager keep them,
flex and flash on a GPU do not) are counted apart. Per block: what a 2-block model saves
minus what the same model with 1 block saves (the embedding's, final norm's and loss's
share cancels).

    python bench/saved_bytes.py [--length 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import levers as lv  # noqa: E402
from bench.common import FULL, format_table  # noqa: E402
from bench.gpu import write_checkpoint  # noqa: E402
from bench.train import build_qlora  # noqa: E402


def saved_bytes(model, ids: torch.Tensor) -> tuple[int, int]:
    """Bytes autograd saves in one forward pass: (all but L x L tensors, L x L tensors)."""
    storages: dict[int, tuple[int, bool]] = {}
    length = ids.shape[1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        square = t.dim() >= 2 and t.shape[-1] == t.shape[-2] == length
        storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), square)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    rest = sum(n for n, square in storages.values() if not square)
    return rest, sum(n for n, square in storages.values() if square)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=Path("/tmp/replit-saved-bytes"))
    args = parser.parse_args()
    ids = torch.randint(3, FULL["vocab"], (1, args.length))
    counts: dict[tuple[str, bool], list[tuple[int, int]]] = {}
    for blocks in (1, 2):
        path = str(write_checkpoint(args.work / str(blocks), {**FULL, "n_layers": blocks}))
        for name, (rest, square) in measure_all(path, ids).items():
            counts.setdefault(name, []).append((rest, square))
    rows = []
    for (name, checkpointing), ((rest1, _), (rest2, square2)) in counts.items():
        per_block = (rest2 - rest1) / args.length
        rows.append(
            [
                name,
                "on" if checkpointing else "off",
                f"{per_block / 1e3:.1f}",
                f"{per_block * FULL['n_layers'] / 1e6:.2f}",
                f"{square2 / 2 / 1e6:.0f}",
            ]
        )
    print(
        format_table(
            ["model", "checkpointing", "KB/token/block", "x 32 blocks MB/token", "L x L MB/block"],
            rows,
        )
    )
    print(
        f"\nd_model {FULL['d_model']}, one row of {args.length} tokens, LoRA r16 (dropout 0.05) "
        "on Wqkv/up_proj/down_proj, bf16 autocast on CPU"
    )


def measure_all(path: str, ids: torch.Tensor) -> dict[tuple[str, bool], tuple[int, int]]:
    """Saved bytes of the kit with each lever and of transformers + peft, checkpointing on
    and off, for the checkpoint at `path`."""
    return _ours(path, ids) | _theirs(path, ids)


def _ours(path: str, ids: torch.Tensor) -> dict[tuple[str, bool], tuple[int, int]]:
    model = build_qlora("ours", path, ids.shape[1], "bf16", "cpu", 0.05).train()
    base = model.get_base_model()
    levers = {"kit": lambda base: contextlib.nullcontext()}
    levers |= {name: lv.LEVERS[name] for name in ("bf16_blocks", "bf16_residual", "fused_lora")}
    out = {}
    for checkpointing in (True, False):
        for name, lever in levers.items():
            off = contextlib.nullcontext() if checkpointing else lv.checkpointing_off(base)
            with off, lever(base):
                out[name, checkpointing] = saved_bytes(model, ids)
    return out


def _theirs(path: str, ids: torch.Tensor) -> dict[tuple[str, bool], tuple[int, int]]:
    model = build_qlora("baseline", path, ids.shape[1], "bf16", "cpu", 0.05).train()
    out = {("transformers + peft", True): saved_bytes(model, ids)}
    model.base_model.model.activation_checkpointing_disable()
    out["transformers + peft", False] = saved_bytes(model, ids)
    return out


if __name__ == "__main__":
    main()
