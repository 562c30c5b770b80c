"""`replit-ft export gguf` checked against llama.cpp itself (llama-cpp-python), on CPU.

What: a merged checkpoint (a tiny one written here by default, or any `--model`, e.g. the
full-size random one bench/merge.py leaves with --keep) is exported to GGUF, then
- logits: llama.cpp evaluates the first `--positions` token ids of a real source file
  (SentencePiece's ids) and its logits are compared with the kit's model (load_model, fp32
  compute) on the same ids: max and mean |difference|, and top-1 agreement;
- tokenization: llama.cpp's tokenizer (the GGUF's vocabulary) and plain transformers
  `AutoTokenizer` on the merged folder (its tokenizer.json, the baseline a transformers user
  gets) against SentencePiece (spiece.model, what the model was trained on), on every
  top-level file of the Python standard library: whole files and 30-line chunks identical,
  the share of tokens inside segments that differ, and whether every difference is a tie
  (both segmentations score the same within float32's resolution; see finetune/gguf_vocab.py).

How: each step runs in its own process (bench/common.run_worker), so peak memory is the
step's own: the export streams tensors from the merged files; the kit's model is loaded in
fp32 (10.4 GB at full size); llama.cpp maps the GGUF (page cache, not anonymous memory).
Peak memory is RssAnon sampled every 20 ms. Timings include loading.

Commands (from the repository root; llama-cpp-python builds llama.cpp from source, about
6 minutes on 2 cores: CMAKE_BUILD_PARALLEL_LEVEL=2 .venv/bin/pip install -e '.[gguf-check]'):
    .venv/bin/python bench/gguf.py
    .venv/bin/python bench/merge.py --keep
    .venv/bin/python bench/gguf.py --model /tmp/replit-full-random-merged-bf16 --types f16
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import sysconfig
import time
from pathlib import Path

# Run as `python bench/gguf.py`, bench/ is first on the path, where this file would shadow the
# `gguf` package: put the repository root there instead (for `bench.common` and the kit).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import (  # noqa: E402
    GB,
    PeakSampler,
    available_memory_bytes,
    emit_result,
    ensure_repo_on_path,
    format_table,
    gb,
    rss_anon_bytes,
    run_worker,
)
from model.tokenizer import TIE, differing_segments, segmentation_score  # noqa: E402

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "replit-code-v1-3b"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
LOGITS_SOURCE = STDLIB / "argparse.py"
TINY = {"n_layers": 4, "d_model": 256, "n_heads": 8}
CHUNK_LINES = 30


def tiny_worker(root: str) -> None:
    """A tiny base with the real vocabulary, a random LoRA adapter, merged in bf16."""
    ensure_repo_on_path()
    root = Path(root)
    from peft import LoraConfig, get_peft_model

    from finetune.merge import merge
    from finetune.run_folder import write_record
    from model import load_model
    from model.random_checkpoint import write_checkpoint

    base = write_checkpoint(root / "base", **TINY, tokenizer=SHARED_TOKENIZER, std=0.05)
    adapter = root / "run" / "adapter"
    targets = ["Wqkv", "out_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    get_peft_model(load_model(base), config).save_pretrained(adapter)
    write_record(adapter, {"base": str(base), "max_seq_len": 4096, "fim": None})  # as train does
    merge(adapter, root / "merged", dtype="bf16", overwrite=True, progress=False)
    emit_result({"merged": str(root / "merged")})


def export_worker(model: str, out: str, weight_type: str) -> None:
    ensure_repo_on_path()
    out = Path(out)
    from finetune.export_gguf import export_gguf

    with PeakSampler(rss_anon_bytes) as anon:
        start = time.perf_counter()
        export_gguf(out, model=model, weight_type=weight_type, overwrite=True, progress=False)
        seconds = time.perf_counter() - start
    emit_result({"seconds": seconds, "peak_anon": anon.peak, "bytes": out.stat().st_size})


def source_ids(model: str, positions: int) -> list[int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(model) / "spiece.model"))
    return sp.encode(LOGITS_SOURCE.read_text(encoding="utf-8"))[:positions]


def kit_worker(model: str, positions: int, out: str) -> None:
    """The kit's logits on the ids, fp32 compute, saved for the llama.cpp worker."""
    ensure_repo_on_path()
    import numpy as np
    import torch

    from model import load_model

    ids = source_ids(model, positions)
    with PeakSampler(rss_anon_bytes) as anon:
        start = time.perf_counter()
        net = load_model(model, compute_dtype="fp32", device="cpu")
        with torch.no_grad():
            logits = net(torch.tensor([ids])).logits[0].float().numpy()
        seconds = time.perf_counter() - start
    np.save(out, logits)
    emit_result({"seconds": seconds, "peak_anon": anon.peak, "positions": len(ids)})


def llama_worker(gguf_file: str, model: str, positions: int, reference: str) -> None:
    """llama.cpp's logits on the same ids, compared with the kit's."""
    import llama_cpp
    import numpy as np

    ids = source_ids(model, positions)
    want = np.load(reference)
    with PeakSampler(rss_anon_bytes) as anon:
        start = time.perf_counter()
        llm = llama_cpp.Llama(
            gguf_file,
            n_ctx=max(512, len(ids)),
            n_batch=512,
            logits_all=True,
            n_threads=2,
            verbose=False,
        )
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        seconds = time.perf_counter() - start
        context = int(llm.metadata["mpt.context_length"])
        llm.close()
    diff = np.abs(got - want)
    emit_result(
        {
            "seconds": seconds,
            "peak_anon": anon.peak,
            "max_abs": float(diff.max()),
            "mean_abs": float(diff.mean()),
            "logit_scale": float(np.abs(want).max()),
            "top1": float((got.argmax(-1) == want.argmax(-1)).mean()),
            "context_length": context,
        }
    )


def tokens_worker(gguf_file: str, model: str) -> None:
    """llama.cpp's and AutoTokenizer's ids against SentencePiece's on the standard library."""
    import llama_cpp
    import sentencepiece as spm
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "sequence longer than model_max_length" per file
    sp = spm.SentencePieceProcessor(model_file=str(Path(model) / "spiece.model"))
    llm = llama_cpp.Llama(gguf_file, vocab_only=True, verbose=False)
    auto = AutoTokenizer.from_pretrained(model)
    tokenizers = {
        "llama.cpp (GGUF)": lambda text: llm.tokenize(text.encode(), add_bos=False, special=False),
        "AutoTokenizer (tokenizer.json)": lambda text: auto(text).input_ids,
    }
    files = sorted(STDLIB.glob("*.py"))
    texts = [f.read_text(encoding="utf-8") for f in files]
    chunks = [
        "".join(lines[i : i + CHUNK_LINES])
        for text in texts
        for lines in [text.splitlines(keepends=True)]
        for i in range(0, len(lines), CHUNK_LINES)
    ]
    long_run = re.compile(" {33,}")
    want_files, want_chunks = [sp.encode(t) for t in texts], sp.encode(chunks)
    results = {}
    for name, encode in tokenizers.items():
        start = time.perf_counter()
        got = [encode(t) for t in texts]
        seconds = time.perf_counter() - start
        differ = [differing_segments(a, b, sp) for a, b in zip(got, want_files, strict=True)]
        segments = [pair for pairs in differ for pair in pairs]
        chunk_ids = [encode(c) for c in chunks]
        short = [i for i, c in enumerate(chunks) if not long_run.search(c)]
        results[name] = {
            "files": len(texts),
            "files_identical": sum(a == b for a, b in zip(got, want_files, strict=True)),
            "tokens": sum(len(b) for b in want_files),
            "tokens_in_differing_segments": sum(len(b) for _, b in segments),
            "differing_segments": len(segments),
            "all_ties": all(
                abs(segmentation_score(a, sp) - segmentation_score(b, sp)) < TIE
                for a, b in segments
            ),
            "chunks": len(chunks),
            "chunks_identical": sum(a == b for a, b in zip(chunk_ids, want_chunks, strict=True)),
            "chunks_without_33_spaces": len(short),
            "those_identical": sum(chunk_ids[i] == want_chunks[i] for i in short),
            "seconds": seconds,
        }
    llm.close()
    emit_result(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="merged folder (default: a tiny one)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/replit-gguf-bench"))
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        workers = {
            "tiny": tiny_worker,
            "export": export_worker,
            "kit": kit_worker,
            "llama": llama_worker,
            "tokens": tokens_worker,
        }
        workers[args.worker](*json.loads(args.args))
        return

    def worker(name: str, *params: object) -> dict:
        r = run_worker(Path(__file__), ["--worker", name, "--args", json.dumps(params)])
        if "error" in r:
            raise SystemExit(f"{name}: {r['error']}")
        return r

    args.dir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = args.dir / "tiny" / "merged"
        if not (model / "config.json").is_file():
            print(f"writing a tiny merged checkpoint {TINY} to {model} ...", flush=True)
            worker("tiny", str(args.dir / "tiny"))
    print(
        f"model {model} (MemAvailable {available_memory_bytes() / GB:.1f} GB)\n"
        f"logits on the first {args.positions} ids of {LOGITS_SOURCE}",
        flush=True,
    )
    reference = args.dir / "kit-logits.npy"
    kit = worker("kit", str(model), args.positions, str(reference))
    rows = []
    files, raw = {}, {"kit": kit}
    for weight_type in args.types:
        out = args.dir / f"{model.name}-{weight_type}.gguf"
        made = worker("export", str(model), str(out), weight_type)
        r = worker("llama", str(out), str(model), args.positions, str(reference))
        files[weight_type] = out
        raw[weight_type] = {"export": made, "llama.cpp": r}
        rows.append(
            [
                weight_type,
                f"{made['seconds']:.1f}",
                gb(made["bytes"]),
                gb(made["peak_anon"]),
                f"{r['max_abs']:.4f}",
                f"{r['mean_abs']:.5f}",
                f"{r['logit_scale']:.2f}",
                f"{100 * r['top1']:.1f}%",
                f"{r['seconds']:.1f}",
                gb(r["peak_anon"]),
                str(r["context_length"]),
            ]
        )
    print()
    headers = ["GGUF", "export s", "file GB", "export peak GB", "max |Δ|", "mean |Δ|",
               "max |logit|", "top-1 same", "llama.cpp s", "peak GB", "context"]  # fmt: skip
    print(format_table(headers, rows))
    print(
        f"\nkit: load_model fp32, {kit['positions']} positions, {kit['seconds']:.1f} s, "
        f"peak RssAnon {gb(kit['peak_anon'])} GB. Δ = llama.cpp logits - kit logits; "
        "times include loading; peak: RssAnon (llama.cpp maps the file: page cache)."
    )

    tokens = worker("tokens", str(files[args.types[0]]), str(model))
    rows = []
    for name, t in tokens.items():
        rows.append(
            [
                name,
                f"{t['files_identical']}/{t['files']}",
                f"{100 * (1 - t['tokens_in_differing_segments'] / t['tokens']):.3f}%",
                str(t["differing_segments"]),
                "yes" if t["all_ties"] else "NO",
                f"{t['chunks_identical']}/{t['chunks']}",
                f"{t['those_identical']}/{t['chunks_without_33_spaces']}",
                f"{t['seconds']:.1f}",
            ]
        )
    headers = ["against SentencePiece", "files same", "tokens outside diffs", "diffs",
               "all ties", "30-line chunks same", "without 33+ spaces", "s"]  # fmt: skip
    print()
    print(format_table(headers, rows))
    print(
        f"\n{tokens[name]['files']} files: {STDLIB}/*.py. A diff is a stretch both cut at the "
        f"same places around; a tie: both segmentations score within {TIE} (SentencePiece "
        "sums in float32, llama.cpp and tokenizers in float64)."
    )
    print("\nraw:", json.dumps(raw | {"tokens": tokens}))


if __name__ == "__main__":
    main()
