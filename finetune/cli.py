"""`replit-ft`: the kit's command line. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import math
import sys

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="replit-ft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="check a checkpoint's files and describe it")
    inspect.add_argument("checkpoint", help="local directory or hub id")
    inspect.set_defaults(run=inspect_checkpoint)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"replit-ft {args.command}: {err}")


if __name__ == "__main__":
    main()
