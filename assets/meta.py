"""Small helpers for Dagster metadata: Markdown tables and PNG plots."""


import base64
import io

import matplotlib

matplotlib.use("Agg")  # assets render PNGs in worker processes: never a GUI backend
import matplotlib.pyplot as plt  # noqa: E402

import dagster as dg  # noqa: E402
import polars as pl  # noqa: E402

__all__ = ["md_table", "plt", "png_md"]


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
