"""The closing summary of a data preparation, as a plain-text table."""

from __future__ import annotations

import textwrap

from data_prep.prepare import Prepared

# Skipped names printed per reason; the manifest lists them all.
SHOWN_NAMES = 20


def summary(result: Prepared) -> str:
    """Sources, skips by reason (with the first names), over-long examples, and per split:
    documents, tokens, rows, packing efficiency."""
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
    names = m.get("skipped_files", {})
    for reason, count in m["skipped"].items():
        lines.append(f"skipped  {count:>8}  {reason}")
        shown = names.get(reason, [])[:SHOWN_NAMES]
        more = f" and {count - len(shown)} more in {result.path / 'manifest.json'}"
        text = ", ".join(shown) + (more if count > len(shown) else "")
        indent = " " * 19
        lines += textwrap.wrap(
            text,
            100,
            initial_indent=indent,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
    overlong = m.get("overlong", {})
    if any(overlong.get(k) for k in ("dropped", "truncated", "split")):
        lines.append(
            f"overlong {overlong['dropped']:>8} dropped, {overlong['truncated']} truncated, "
            f"{overlong['split']} split: instruction examples longer than seq_len "
            f"(data.overlong: {overlong['policy']})"
        )
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
    if fim := m.get("fim"):
        pieces = sum(s["fim_documents"] for s in m["splits"].values())
        lines.append(
            f"fill-in-the-middle: rate {fim['rate']}, SPM {fim['spm_rate']}, sentinels "
            f"{fim['prefix_id']}/{fim['suffix_id']}/{fim['middle_id']}: {pieces:,} FIM documents"
        )
    return "\n".join(lines)
