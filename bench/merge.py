"""Time and peak memory of `finetune.merge.merge` on a full-size replit-code-v1-3b, on CPU.

What: a random checkpoint with the real model's dimensions and published layout (32
layers, d_model 2560, n_heads 32, vocab 32768; one fp32 pytorch_model.bin of 10.4 GB,
shared with bench/load_full.py) and a random rank-16 LoRA adapter on Wqkv, out_proj,
up_proj and down_proj (alpha 32; lora_B non-zero, so every target weight changes) are
merged in bf16:
    merge(adapter, out, dtype="bf16")
in a subprocess: load the base, merge 128 layers in fp32, write 5.2 GB of sharded
safetensors, the tokenizer and the model card.

How: the checkpoint gets the real tokenizer files from ../shared/replit-code-v1-3b (the
merge copies them into its output). The adapter is written from the shapes alone (peft's
tensor names, random values, adapter_config.json from peft's LoraConfig), never loading
the model, and kept for later runs. During the merge call a background thread samples
RssAnon from /proc/self/status every 20 ms (absolute: the interpreter and imports count;
their RssAnon before the call is shown too). Pages mapped from the checkpoint file are
page cache, not anonymous memory.

Afterwards, outside the measurement, the result is checked: the written files' names and
shapes (headers), and two merged tensors bit for bit against round_bf16(W + 2 * B @ A)
computed from the checkpoint and the adapter, and an untouched one against round_bf16(W).
Targets of the issue: peak RssAnon under 12 GB and wall time under 3 minutes (GB = 1e9).

Command (from the repository root; the checkpoint takes a few minutes to write the first
time, and its writer holds 10.4 GB):
    .venv/bin/python bench/merge.py
    .venv/bin/python bench/merge.py --dir /tmp/replit-full-random --keep
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

# Run as `python bench/X.py`, only bench/ would be on the path: put the repository root
# there, so `bench.common` imports one way however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    FULL,
    GB,
    PeakSampler,
    available_memory_bytes,
    emit_result,
    ensure_repo_on_path,
    format_table,
    gb,
    malloc_trim,
    prepare_checkpoint,
    proc_status_bytes,
    reset_peak_rss,
    rss_anon_bytes,
    run_worker,
)

DEFAULT_DIR = Path("/tmp/replit-full-random")
TARGETS = {"Wqkv": "attn", "out_proj": "attn", "up_proj": "ffn", "down_proj": "ffn"}
RANK, ALPHA = 16, 32
TARGET_GB, TARGET_SECONDS = 12.0, 180.0
TOKENIZER_FILES = ["spiece.model", "tokenizer_config.json", "special_tokens_map.json"]
SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "replit-code-v1-3b"
CHECKED = ["transformer.blocks.0.attn.Wqkv.weight", "transformer.blocks.31.ffn.down_proj.weight"]


def adapter_worker(base: Path, path: Path) -> None:
    """Write a random rank-16 adapter for the full-size shapes (temp dir + rename)."""
    ensure_repo_on_path()
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    d, hidden = FULL["d_model"], 4 * FULL["d_model"]
    shapes = {
        "Wqkv": (3 * d, d),
        "out_proj": (d, d),
        "up_proj": (hidden, d),
        "down_proj": (d, hidden),
    }
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(FULL["n_layers"]):
        for name, (out_features, in_features) in shapes.items():
            key = f"base_model.model.transformer.blocks.{i}.{TARGETS[name]}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, in_features, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, RANK, generator=gen) * 0.01
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    partial.mkdir(parents=True)
    save_file(tensors, partial / "adapter_model.safetensors", metadata={"format": "pt"})
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS))
    config.base_model_name_or_path = str(base)
    config.save_pretrained(partial)
    os.rename(partial, path)
    emit_result({"written": str(path)})


def add_tokenizer(path: Path) -> None:
    """Copy the real tokenizer files into the checkpoint folder: merge() writes them out too."""
    if (path / "spiece.model").is_file():
        return
    if not (SHARED_TOKENIZER / "spiece.model").is_file():
        raise SystemExit(f"{SHARED_TOKENIZER}: no spiece.model to give the checkpoint a tokenizer")
    for name in TOKENIZER_FILES:
        shutil.copy(SHARED_TOKENIZER / name, path / name)


def merge_worker(adapter: Path, out: Path) -> None:
    """Merge once, sampling RssAnon, then check the result and emit the figures."""
    ensure_repo_on_path()
    import torch

    from finetune.merge import merge

    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    malloc_trim()
    anon_before = rss_anon_bytes()
    reset_peak_rss()
    with PeakSampler(rss_anon_bytes, interval=0.02) as anon:
        start = time.perf_counter()
        merge(adapter, out, dtype="bf16")
        seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "anon_before": anon_before,
        "peak_anon": anon.peak,
        "samples": anon.samples,
        "peak_rss": proc_status_bytes("VmHWM"),
        "written": sum(f.stat().st_size for f in out.iterdir()),
        "shards": len(list(out.glob("*.safetensors"))),
    }
    emit_result(result | {"checks": check_merged(adapter, out)})


def check_merged(adapter: Path, out: Path) -> str:
    """Headers of the written checkpoint, then three tensors bit for bit (see the top)."""
    import torch
    from safetensors import safe_open

    from model.checkpoint import check_weights, read_config

    check_weights(out, read_config(out))
    base_path = Path(
        json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    base = torch.load(base_path / "pytorch_model.bin", mmap=True, weights_only=True)
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())["weight_map"] if index_file.is_file() else {}
    lora_file = adapter / "adapter_model.safetensors"
    with safe_open(lora_file, framework="pt") as lora:
        for name in [*CHECKED, "transformer.wte.weight"]:
            with safe_open(out / index.get(name, "model.safetensors"), framework="pt") as merged:
                got = merged.get_tensor(name)
            want = base[name].clone()
            if name in CHECKED:
                key = "base_model.model." + name.removesuffix(".weight")
                a, b = (
                    lora.get_tensor(f"{key}.lora_A.weight"),
                    lora.get_tensor(f"{key}.lora_B.weight"),
                )
                want += (b @ a) * (ALPHA / RANK)
            if not torch.equal(got, want.to(torch.bfloat16)):
                return f"FAILED: {name} differs from round_bf16(W + BA * scale)"
            if name in CHECKED and torch.equal(got, base[name].to(torch.bfloat16)):
                return f"FAILED: {name} did not change"
    return "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="checkpoint cache dir")
    parser.add_argument("--keep", action="store_true", help="keep the merged checkpoint")
    parser.add_argument("--worker", choices=["adapter", "merge"], help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    adapter = args.adapter or args.dir.with_name(f"{args.dir.name}-lora-r{RANK}")
    out = args.out or args.dir.with_name(f"{args.dir.name}-merged-bf16")
    if args.worker == "adapter":
        adapter_worker(args.dir, adapter)
        return
    if args.worker == "merge":
        merge_worker(adapter, out)
        return

    print(f"checkpoint {args.dir}: {FULL} ...", flush=True)
    ckpt = prepare_checkpoint(args.dir, **FULL)
    if "error" in ckpt:
        raise SystemExit(f"checkpoint: {ckpt['error']}")
    print("  reused" if ckpt["reused"] else f"  written in {ckpt['seconds']:.0f} s", flush=True)
    add_tokenizer(args.dir)
    if not (adapter / "adapter_config.json").is_file():
        made = run_worker(Path(__file__), ["--worker", "adapter", "--dir", str(args.dir)])
        if "error" in made:
            raise SystemExit(f"adapter: {made['error']}")
    print(f"adapter {adapter}: rank {RANK}, alpha {ALPHA}, {', '.join(TARGETS)}", flush=True)

    print(
        f'merge(adapter, "{out}", dtype="bf16") in a subprocess '
        f"(MemAvailable {available_memory_bytes() / GB:.1f} GB, load {os.getloadavg()[0]:.1f}) ...",
        flush=True,
    )
    worker = ["--worker", "merge", "--dir", str(args.dir), "--adapter", str(adapter)]
    r = run_worker(Path(__file__), [*worker, "--out", str(out)])
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    if "error" in r:
        raise SystemExit(f"merge: {r['error']}")
    met = r["peak_anon"] < TARGET_GB * GB and r["seconds"] < TARGET_SECONDS
    headers = ["merge", "time s", "peak RssAnon GB", "RssAnon before GB", "peak RSS GB",
               "written GB", "shards", "threads", "check", ""]  # fmt: skip
    row = [
        "bf16, rank 16",
        f"{r['seconds']:.1f}",
        gb(r["peak_anon"]),
        gb(r["anon_before"]),
        gb(r["peak_rss"]),
        gb(r["written"]),
        str(r["shards"]),
        str(r["threads"]),
        r["checks"],
        "MET" if met else "MISSED",
    ]
    print()
    print(format_table(headers, [row]))
    print(
        f"\ntargets: peak RssAnon < {TARGET_GB:.0f} GB, time < {TARGET_SECONDS:.0f} s. peak "
        "RssAnon: /proc/self/status sampled every 20 ms during merge() (absolute). peak RSS: "
        "VmHWM, includes checkpoint pages mapped from the page cache. GB = 1e9 bytes."
    )
    print("\nraw:", json.dumps(r))


if __name__ == "__main__":
    main()
