"""`eval context`: mean next-token loss by position, to see what a longer context changed.

Over held-out code, the loss of each token given everything before it, averaged in buckets
of positions (0-255, 256-511, ... up to --seq-len). A model that uses a longer context
has a loss that keeps falling with position; one that does not rises past the context it
was trained at. With an adapter, the base (adapter disabled) is measured on the same
windows, side by side.

The windows: from code (--code), each document data_prep collects and tokenizes as for
training that has at least seq_len tokens gives its first seq_len; from a prepared dataset
(--data), each validation row gives its first seq_len tokens, a token's position being its
`position_ids` (its place in its document) and tokens without a label left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.files import write_atomic
from model.modeling import LOSS_CHUNK_TOKENS


@dataclass
class Windows:
    """Rows of seq_len tokens: ids, each token's position, and which tokens are scored."""

    input_ids: np.ndarray  # [n, seq_len]
    position_ids: np.ndarray  # [n, seq_len]
    scored: np.ndarray  # [n, seq_len] bool; never a document's first token
    source: dict[str, Any]


def windows_from_code(
    paths: Sequence[str], tokenizer, seq_len: int, *, progress: bool = True
) -> Windows:
    """The first seq_len tokens of every collected document that has that many."""
    from data_prep.code import collect_code
    from data_prep.tokens import encode_documents

    try:
        corpus = collect_code(paths)
    except (FileNotFoundError, PermissionError) as err:  # a path given, missing or locked
        raise type(err)(f"--code: {err}") from None
    if not corpus.documents:
        raise ValueError(f"no code files under {', '.join(paths)}")
    rows, longest = [], 0
    for ids, _ in encode_documents(tokenizer, corpus.documents, progress=progress):
        longest = max(longest, len(ids))
        if len(ids) >= seq_len:
            rows.append(ids[:seq_len])
    if not rows:
        raise ValueError(
            f"no file under {', '.join(paths)} has {seq_len} tokens (the longest has "
            f"{longest}): give longer files or a smaller --seq-len"
        )
    ids = np.stack(rows)
    positions = np.tile(np.arange(seq_len), (len(rows), 1))
    source = {
        "code": list(paths),
        "documents": len(corpus.documents),
        "windows": len(rows),
        "shorter_than_seq_len": len(corpus.documents) - len(rows),
    }
    return Windows(ids, positions, positions > 0, source)


def windows_from_data(folder: str | os.PathLike, tokenizer, seq_len: int) -> Windows:
    """The first seq_len tokens of every validation row of a prepared dataset."""
    from datasets import DatasetDict

    folder = Path(folder)
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{manifest_file}: missing; --data takes a `replit-ft prep` folder")
    manifest = json.loads(manifest_file.read_text())
    ours = hashlib.sha256(Path(tokenizer.vocab_file).read_bytes()).hexdigest()
    if manifest.get("tokenizer", {}).get("sha256") != ours:
        raise ValueError(f"{folder} was tokenized with another tokenizer than the model's")
    split = DatasetDict.load_from_disk(str(folder))["validation"]
    if len(split) == 0:
        raise ValueError(f"{folder} has no validation rows: prepare it with --validation-fraction")
    split = split.with_format("numpy")
    ids = np.asarray(split["input_ids"])
    if ids.shape[1] < seq_len:
        raise ValueError(
            f"{folder} has rows of {ids.shape[1]} tokens, fewer than --seq-len {seq_len}: "
            f"prepare it with --seq-len {seq_len}"
        )
    positions = np.asarray(split["position_ids"])[:, :seq_len]
    scored = (np.asarray(split["labels"])[:, :seq_len] != -100) & (positions > 0)
    source = {"data": str(folder), "windows": len(ids)}
    return Windows(ids[:, :seq_len], positions, scored, source)


def token_losses(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """-log p(token j | the tokens before it) for j = 1 .. L-1 of one row, in fp32.

    The model's own loss is a mean, and its logits for a whole row would be L x 32768
    floats (2 GiB at 16k tokens); this takes the final hidden states instead and projects
    them in chunks of LOSS_CHUNK_TOKENS, as the model's loss does.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden: list[torch.Tensor] = []
    hook = base.transformer.norm_f.register_forward_hook(lambda m, i, out: hidden.append(out))
    try:
        with torch.no_grad():
            model(
                input_ids=input_ids[None].to(base.device),
                position_ids=position_ids[None].to(base.device),
                logits_to_keep=1,
                use_cache=False,
            )
    finally:
        hook.remove()
    states, targets = hidden[0][0, :-1], input_ids[1:].to(base.device)
    weight = base.transformer.wte.weight
    losses = []
    with torch.no_grad():
        for s in range(0, len(targets), LOSS_CHUNK_TOKENS):
            logits = F.linear(states[s : s + LOSS_CHUNK_TOKENS], weight).float()
            target = targets[s : s + LOSS_CHUNK_TOKENS]
            losses.append(F.cross_entropy(logits, target, reduction="none"))
    return torch.cat(losses).cpu()


def bucket_losses(
    model, windows: Windows, seq_len: int, bucket: int, *, base_too: bool, progress: bool = True
) -> list[dict[str, Any]]:
    """Mean loss and token count per bucket of positions; with `base_too`, the base's beside."""
    from tqdm.auto import tqdm

    n_buckets = -(-seq_len // bucket)
    runs = {"loss": np.zeros(n_buckets)} | ({"base_loss": np.zeros(n_buckets)} if base_too else {})
    counts = np.zeros(n_buckets, dtype=np.int64)
    model.eval()
    for row in tqdm(range(len(windows.input_ids)), desc="context", disable=not progress):
        ids = torch.as_tensor(windows.input_ids[row], dtype=torch.long)
        positions = torch.as_tensor(windows.position_ids[row], dtype=torch.long)
        keep = windows.scored[row][1:]
        where = windows.position_ids[row][1:][keep] // bucket
        counts += np.bincount(where, minlength=n_buckets)
        for name in runs:
            if name == "base_loss":
                with model.disable_adapter():
                    losses = token_losses(model, ids, positions)
            else:
                losses = token_losses(model, ids, positions)
            runs[name] += np.bincount(
                where, weights=losses.numpy()[keep].astype(np.float64), minlength=n_buckets
            )
    rows = []
    for b in range(n_buckets):
        row: dict[str, Any] = {"start": b * bucket, "end": min((b + 1) * bucket, seq_len)}
        row["tokens"] = int(counts[b])
        for name, sums in runs.items():
            row[name] = round(float(sums[b] / counts[b]), 5) if counts[b] else None
        rows.append(row)
    return rows


def evaluate_context(
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None,
    adapter: str | os.PathLike | None = None,
    code: Sequence[str] = (),
    data: str | os.PathLike | None = None,
    seq_len: int,
    bucket: int = 256,
    quantization: str | None = None,
    attn_impl: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Measure, then write DIR/context.json and DIR/context.png; return the results."""
    from finetune.adapter import check_adapter
    from finetune.generate import load_for_generation
    from model.checkpoint import read_config, resolve_checkpoint

    if seq_len < 2 or bucket < 1:
        raise ValueError(
            f"--seq-len must be at least 2 and --bucket at least 1 (got {seq_len}, {bucket})"
        )
    if bool(code) == (data is not None):
        raise ValueError("give held-out code (--code PATH ...) or a prepared dataset (--data DIR)")
    if adapter is not None:
        info = check_adapter(adapter, model)
        trained = {"base": info.base_config.max_seq_len, "adapter": info.max_seq_len}
    else:
        if model is None:
            raise ValueError("name a model (--model), or an adapter (--adapter)")
        trained = {"model": read_config(resolve_checkpoint(model)).max_seq_len}
    started = time.perf_counter()
    loaded, tokenizer = load_for_generation(
        model, adapter, attn_impl=attn_impl, quantization=quantization, max_seq_len=seq_len
    )
    if code:
        windows = windows_from_code(code, tokenizer, seq_len, progress=progress)
    else:
        windows = windows_from_data(data, tokenizer, seq_len)
    buckets = bucket_losses(
        loaded, windows, seq_len, bucket, base_too=adapter is not None, progress=progress
    )
    results = {
        "model": str(model) if model is not None else None,
        "adapter": str(adapter) if adapter is not None else None,
        "quantization": quantization,
        "seq_len": seq_len,
        "bucket": bucket,
        "trained_context": trained,
        "source": windows.source,
        "seconds": round(time.perf_counter() - started, 2),
        "buckets": buckets,
    }
    out = Path(out)
    write_atomic(out / "context.json", json.dumps(results, indent=2) + "\n")
    plot_context(results, out / "context.png")
    return results


def table(results: dict[str, Any]) -> str:
    """The buckets as a plain-text table (the base's loss beside the adapter's, if any)."""
    both = results["adapter"] is not None
    header = f"{'positions':>13}{'tokens':>10}{'loss':>9}" + (f"{'base':>9}" if both else "")
    lines = [header, "-" * len(header)]
    for b in results["buckets"]:
        cells = [b["loss"]] + ([b["base_loss"]] if both else [])
        shown = "".join(f"{c:>9.4f}" if c is not None else f"{'-':>9}" for c in cells)
        lines.append(f"{b['start']:>6}-{b['end'] - 1:<6}{b['tokens']:>10}{shown}")
    return "\n".join(lines)


def plot_context(results: dict[str, Any], path: Path) -> None:
    """Loss by position (bucket middles), base and adapter side by side, trained contexts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = results["buckets"]
    middles = [(b["start"] + b["end"]) / 2 for b in buckets]
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = [("loss", "adapter" if results["adapter"] else "model")]
    if results["adapter"]:
        lines.append(("base_loss", "base"))
    for key, label in lines:
        points = [(x, b[key]) for x, b in zip(middles, buckets, strict=True) if b[key] is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(points) < 40 else None, label=label)
    for name, context in results["trained_context"].items():
        if context < results["seq_len"]:
            ax.axvline(context, color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                f"{name} context {context}",
                (context, 0.98),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color="grey",
            )
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("mean next-token loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
