"""The pictures and the page of `python -m rewrite.report`: PNG plots (matplotlib, Agg), an
index.html that shows them with the metrics and the sampled lines, and the short table the CLI
prints. Everything here reads the report dict only (report.json's content)."""
from __future__ import annotations

import html
import io
from typing import Optional

# The per-mode rows of the table and the page, in order: (key, label, kind).
ROWS = (("lines", "lines (caption not blank)", "int"), ("rewritten", "rewritten", "int"),
        ("fallbacks", "fell back to the caption", "int"), ("identical_to_original", "identical to original", "share"),
        ("empty", "empty", "share"), ("mean_words", "mean words", "num"),
        ("mean_words_original", "mean words, original", "num"), ("distinct_2", "distinct-2", "num"),
        ("example_copies", "copies of a pool example", "int"), ("novel_word_rate", "novel word rate", "share"),
        ("repeated_rewrites", "repeated rewrites", "share"), ("leaked_prompt", "leaked prompt text", "share"),
        ("non_printable", "non-printable text", "share"))
SHARES = ("identical_to_original", "empty", "distinct_2", "novel_word_rate", "repeated_rewrites", "leaked_prompt",
          "non_printable")
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
ORIGINAL = "#777777"


def fmt(value: object, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "int":
        return f"{value:,}"
    if kind == "share":
        return f"{100 * value:.1f}%"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table_rows(report: dict) -> list[list[str]]:
    modes = report["modes"]
    rows = [["metric", *modes]]
    rows += [[label, *(fmt(modes[m].get(key), kind) for m in modes)] for key, label, kind in ROWS]
    between = report.get("between_modes")
    if between:
        rows.append(["bigram Jaccard, all pairs of modes", fmt(between["bigram_jaccard"], "num"),
                     *[""] * (len(modes) - 1)])
    images = report.get("images")
    if images:
        cols = images["columns"]
        rows.append(["CLIP score, mean", *(fmt(cols[m]["mean"], "num") for m in modes)])
        rows.append(["CLIP score, original", *(fmt(cols["original"]["mean"], "num") for _ in modes)])
        rows.append(["CLIP score above original", *(fmt(cols[m]["above_original"], "share") for m in modes)])
    return rows


def text_table(report: dict) -> str:
    rows = table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def _figure(width: float, height: float, ncols: int = 1):
    import matplotlib
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    return plt.subplots(1, ncols, figsize=(width, height))


def lengths_png(report: dict) -> bytes:
    """Word-count histograms: each mode's rewrites against the originals (shares of lines)."""
    fig, ax = _figure(7, 3.2)
    series = [("original", report["original"]["word_count_histogram"], ORIGINAL, "--")]
    series += [(m, s["word_count_histogram"], COLOURS[k % len(COLOURS)], "-")
               for k, (m, s) in enumerate(report["modes"].items())]
    for name, hist, colour, style in series:
        total = sum(hist) or 1
        ax.step(range(len(hist)), [h / total for h in hist], where="mid", color=colour, linestyle=style, label=name)
    last = max((i for _, hist, _, _ in series for i, h in enumerate(hist) if h), default=1)
    ax.set_xlim(-0.5, last + 1.5)
    ax.set_xlabel(f"words per caption (bin {len(series[0][1]) - 1}: that many or more)")
    ax.set_ylabel("share of lines")
    ax.set_title("Caption length: rewrites vs originals")
    ax.legend(frameon=False)
    return _png(fig)


def metrics_png(report: dict) -> bytes:
    """Shares per mode side by side (left) and mean words (right)."""
    fig, (left, right) = _figure(10, 3.6, 2)
    modes = list(report["modes"])
    height = 0.8 / max(len(modes), 1)
    for k, m in enumerate(modes):
        values = [report["modes"][m].get(key) or 0.0 for key in SHARES]
        left.barh([i + k * height for i in range(len(SHARES))], values, height, label=m,
                  color=COLOURS[k % len(COLOURS)])
    left.set_yticks([i + height * (len(modes) - 1) / 2 for i in range(len(SHARES))])
    left.set_yticklabels([s.replace("_", " ") for s in SHARES])
    left.invert_yaxis()
    left.set_xlim(0, 1)
    left.set_title("Metrics per mode (shares)")
    left.legend(frameon=False, fontsize=8, loc="lower right")
    names = ["original", *modes]
    means = [report["original"]["mean_words"] or 0.0] + [report["modes"][m]["mean_words"] or 0.0 for m in modes]
    right.bar(names, means, color=[ORIGINAL, *(COLOURS[k % len(COLOURS)] for k in range(len(modes)))])
    right.set_title("Mean words per caption")
    fig.tight_layout()
    return _png(fig)


def clip_png(images: dict) -> bytes:
    fig, ax = _figure(7, 3.2)
    for k, (name, col) in enumerate(images["columns"].items()):
        edges, counts = col["histogram"]["edges"], col["histogram"]["counts"]
        total = sum(counts) or 1
        colour, style = (ORIGINAL, "--") if name == "original" else (COLOURS[(k - 1) % len(COLOURS)], "-")
        ax.stairs([c / total for c in counts], edges, color=colour, linestyle=style, label=f"{name} ({col['mean']:.3f})"
                  if col["mean"] is not None else name)
    ax.set_xlabel("CLIP score (cosine of image and text embeddings)")
    ax.set_ylabel("share of lines")
    ax.set_title(f"Image agreement, {images['lines_scored']} sampled lines ({images['model']})")
    ax.legend(frameon=False, fontsize=8)
    return _png(fig)


def pictures(report: dict) -> dict[str, bytes]:
    out = {"lengths.png": lengths_png(report), "metrics.png": metrics_png(report)}
    if report.get("images"):
        out["clip.png"] = clip_png(report["images"])
    return out


def _html_table(rows: list[list[str]], numbers: bool = True) -> str:
    def cells(row: list[str], tag: str) -> str:
        return "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows[1:])
    return f"<table{' class=num' if numbers else ''}><tr>{cells(rows[0], 'th')}</tr>{body}</table>"


def _samples_table(report: dict) -> str:
    modes = list(report["modes"])
    rows = [["line", "original", *modes]]
    for s in report["samples"]:
        rows.append([str(s["id"]), s["caption"], *(s["rewrites"][m] for m in modes)])
    return _html_table(rows, numbers=False)


def _clip_table(images: dict) -> str:
    rows = [["texts", "scored", "mean", *(f"p{p}" for p in (5, 25, 50, 75, 95)), "above original"]]
    for name, col in images["columns"].items():
        pct = col["percentiles"] or {}
        rows.append([name, fmt(col["n"], "int"), fmt(col["mean"], "num"),
                     *(fmt(pct.get(str(p)), "num") for p in (5, 25, 50, 75, 95)),
                     "" if name == "original" else fmt(col["above_original"], "share")])
    skipped = ", ".join(f"{k} {v}" for k, v in images["skipped"].items()) or "none"
    return (_html_table(rows) + f"<p class='note'>{images['lines_scored']} of {images['lines_sampled']} sampled lines "
            f"scored with {html.escape(images['model'])} ({html.escape(images['pretrained'])}); left out: "
            f"{html.escape(skipped)}</p>")


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
         "vertical-align:top;font-size:14px}th{background:#f0f0f0}table.num td:not(:first-child){text-align:right}"
         "img{max-width:100%}.note{color:#555;font-size:13px}.row{display:flex;flex-wrap:wrap;gap:16px;"
         "align-items:flex-start}")


def index_html(report: dict, names: list[str]) -> str:
    inp = report["input"]
    between = report.get("between_modes")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Rewrite report</title>"
             f"<style>{STYLE}</style></head><body><h1>Rewrite report</h1>",
             f"<p>{html.escape(inp['kind'])} outputs: {html.escape(', '.join(inp['files']))}"
             + (f"; source {html.escape(inp['source'])}" if inp.get("source") else "")
             + f". {report['lines']:,} lines read, {report['blank_captions']:,} with a blank caption left out."
             " Every metric is defined in docs/report.md.</p>",
             "<h2>Metrics per mode</h2><div class=row>", _html_table(table_rows(report)),
             "<img src='metrics.png' alt='metrics per mode'></div>",
             "<h2>Lengths</h2><img src='lengths.png' alt='word-count histograms'>"]
    if between:
        pairs = [["pair", "mean bigram Jaccard"]] + [[k.replace("|", " / "), fmt(v, "num")]
                                                      for k, v in between["bigram_jaccard_per_pair"].items()]
        parts += ["<h2>Between modes</h2>", _html_table(pairs),
                  f"<p class='note'>all modes' rewrites identical on {fmt(between['all_identical'], 'share')} of "
                  "lines</p>"]
    if "clip.png" in names:
        parts += ["<h2>Image agreement</h2>", _clip_table(report["images"]),
                  "<img src='clip.png' alt='CLIP score histograms'>"]
    parts += [f"<h2>Sampled lines ({len(report['samples'])}, uniform, seed {report['seed']})</h2>",
              _samples_table(report), "</body></html>"]
    return "\n".join(parts)


def page(report: dict) -> dict[str, bytes]:
    """Every file of DIR but report.json: the PNGs and index.html."""
    files = pictures(report)
    files["index.html"] = index_html(report, list(files)).encode("utf-8")
    return files


def first_note(report: dict) -> Optional[str]:
    """A line on the counts the rewriter recorded, when they differ from the lines' (docs/report.md)."""
    for m, s in report["modes"].items():
        rec = s.get("recorded")
        if rec and rec.get("rewritten") != s["rewritten"]:
            return (f"note: {m}: the rewriter recorded {rec['rewritten']} rewritten, the lines show {s['rewritten']} "
                    "(a rewrite equal to its caption reads as a fallback)")
    return None
