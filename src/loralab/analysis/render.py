"""Results tables as GitHub markdown, LaTeX (booktabs) and a tidy CSV, written by pandas."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pandas.io.formats.style_render import _escape_latex  # the escaping Styler applies to cells

from ..store import atomic_write, write_text
from .tables import Pivot

# After escaping: the symbols of our cells and captions in LaTeX math, and the en dash of empty cells.
_TEX_SYMBOLS = {"±": r"$\pm$", "†": r"$^\dagger$", "–": "--"}


def to_markdown(table: pd.DataFrame) -> str:
    """GitHub markdown: row labels left, cells centred, cell text as is (pipes escaped)."""
    escaped = table.rename(index=_esc_md, columns=_esc_md).map(_esc_md)
    escaped.index.name = _esc_md(table.index.name or "")
    colalign = ["left", *["center"] * len(table.columns)]
    return escaped.to_markdown(colalign=colalign, disable_numparse=True)


def _esc_md(value: object) -> str:
    return str(value).replace("|", "\\|")


def _tex_symbols(text: str) -> str:
    for symbol, tex in _TEX_SYMBOLS.items():
        text = text.replace(symbol, tex)
    return text


def _tex(value: object) -> str:
    return _tex_symbols(_escape_latex(str(value)))


def to_latex(table: pd.DataFrame, caption: str = "") -> str:
    """A booktabs tabular (wrapped in a table env with caption when given)."""
    flat = table.reset_index().astype(str)
    flat.columns = [table.index.name or "", *map(str, table.columns)]
    styler = (
        flat.style.hide(axis="index")
        .format(_tex_symbols, escape="latex")
        .format_index(_tex_symbols, escape="latex", axis="columns")
    )
    options = {"position": "t", "position_float": "centering", "caption": _tex(caption)} if caption else {}
    return styler.to_latex(column_format="l" + "c" * len(table.columns), hrules=True, **options).rstrip("\n")


def render(pivots: Pivot | dict[str, Pivot]) -> tuple[str, str, pd.DataFrame]:
    """Markdown, LaTeX and tidy CSV frame for one pivot or a dict of per-block pivots."""
    if isinstance(pivots, Pivot):
        return (
            to_markdown(pivots.display) + f"\n\n{pivots.caption()}\n",
            to_latex(pivots.display, pivots.caption()) + "\n",
            pivots.tidy,
        )
    md, tex, csv = [], [], []
    for name, p in pivots.items():
        md.append(f"**{name}**\n\n{to_markdown(p.display)}\n")
        tex.append(f"% {name}\n" + to_latex(p.display, f"{name}. {p.caption()}"))
        csv.append(p.tidy.assign(block=name))
    first = next(iter(pivots.values()))
    return (
        "\n".join(md) + f"\n{first.caption()}\n",
        "\n\n".join(tex) + "\n",
        pd.concat(csv, ignore_index=True),
    )


def write_outputs(rendered: tuple[str, str, pd.DataFrame], prefix: str | Path) -> dict[str, Path]:
    """Write what `render` made to PREFIX.md, PREFIX.tex, PREFIX.csv; returns the paths."""
    md, tex, csv = rendered
    prefix = Path(prefix)
    paths = {ext: prefix.with_name(prefix.name + "." + ext) for ext in ("md", "tex", "csv")}
    write_text(paths["md"], md)
    write_text(paths["tex"], tex)
    atomic_write(paths["csv"], lambda tmp: csv.to_csv(tmp, index=False))
    return paths
