"""The closing summary of a data preparation, as a plain-text table."""

from __future__ import annotations

from data_prep.prepare import Prepared


def summary(result: Prepared) -> str:
    """Sources, skips by reason, and per split: documents, tokens, rows, packing efficiency."""
    m = result.manifest
    lines = [
        f"dataset  {result.path}" + ("  (reused: inputs and settings unchanged)" * result.reused)
    ]
    for source in m["sources"]:
        if "code" in source:
            lines.append(
                f"code     {', '.join(source['code'])}: {source['documents']} documents "
                f"of {source['files_seen']} files"
            )
        else:
            lines.append(
                f"instr.   {source['instructions']} ({source['format']}): "
                f"{source['documents']} documents"
            )
    for reason, count in m["skipped"].items():
        lines.append(f"skipped  {count:>8}  {reason}")
    header = f"{'split':<11}{'docs':>8}{'tokens':>13}{'trained':>13}{'rows':>8}{'packed':>8}"
    lines += ["", header, "-" * len(header)]
    for name, s in m["splits"].items():
        lines.append(
            f"{name:<11}{s['documents']:>8}{s['tokens']:>13,}{s['trained_tokens']:>13,}"
            f"{s['rows']:>8}{s['packing_efficiency']:>8.1%}"
        )
    settings = m["settings"]
    lines.append(
        f"\nseq_len {settings['seq_len']}, {'packed' if settings['packed'] else 'padded'} rows, "
        f"tokenizer {m['tokenizer']['name']} (sha256 {m['tokenizer']['sha256'][:12]})"
    )
    return "\n".join(lines)
