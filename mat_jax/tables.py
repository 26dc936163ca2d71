"""Aligned plain-text tables, as the command lines print them (results, benchmarks, the demo)."""

from __future__ import annotations

from typing import Sequence


def aligned(header: Sequence[str], rows: Sequence[Sequence[str]], *, left_columns: int = 1) -> list[str]:
  """The lines of a table of strings: the first `left_columns` columns left-aligned (labels), the others
  right-aligned (numbers), columns two spaces apart, a dashed rule under the header."""
  cells = [list(header), *map(list, rows)]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  lines = []
  for i, row in enumerate(cells):
    lines.append("  ".join(c.ljust(w) if j < left_columns else c.rjust(w)
                           for j, (c, w) in enumerate(zip(row, widths, strict=True))))
    if i == 0:
      lines.append("  ".join("-" * w for w in widths))
  return lines
