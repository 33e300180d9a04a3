"""Small helpers for Dagster metadata: Markdown tables and PNG plots."""


import base64
import io

import matplotlib

matplotlib.use("Agg")  # assets render PNGs in worker processes: never a GUI backend
import matplotlib.pyplot as plt  # noqa: E402

import dagster as dg  # noqa: E402
import polars as pl  # noqa: E402

__all__ = ["curve_plot", "margin_and_category_plot", "md_table", "plt", "png_md"]


def md_table(df: pl.DataFrame, floatfmt: str = "{:.3f}") -> str:
    if df.is_empty():
        return "_empty_"
    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.iter_rows():
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def png_md(fig) -> dg.MetadataValue:
    """A matplotlib figure inlined as Markdown so the Dagster UI shows the picture."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    b64 = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{b64})")


def margin_and_category_plot(scored: pl.DataFrame, per_category: pl.DataFrame, split: str):
    """What a person would rather look at than one accuracy: the margin distribution and accuracy per category."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 2.8))
    ax1.hist(scored["margin"].to_numpy(), bins=30, color="#4a7")
    ax1.axvline(0, color="k", lw=0.8)
    ax1.set_title(f"{split} reward margin r(chosen) - r(rejected)", fontsize=8)
    ax2.bar([str(c) for c in per_category["task_category"]], per_category["accuracy"].to_numpy(), color="#47a")
    ax2.set_ylim(0, 1)
    ax2.tick_params(axis="x", labelsize=6, rotation=30)
    ax2.set_title(f"{split} accuracy per category", fontsize=8)
    return fig


def curve_plot(x, y, xlabel: str, ylabel: str):
    """One metric against a step or iteration."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(x, y, marker="o")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig
