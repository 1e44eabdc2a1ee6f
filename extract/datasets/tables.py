"""Text tables (.csv, .xlsx): one row per image, its text and optionally its split."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extract.datasets.core import DatasetError

_TEXT_COLUMNS = ("text", "description", "caption")


@dataclass(frozen=True)
class Row:
    table: Path
    where: str         # "row 4" (header = row 1) or "valid[3]" (JSON list position)
    image: str
    text: str
    split: str | None  # None: the table's default split


def cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def _read_rows(path: Path) -> list[list[str]]:
    """All rows of a .csv / .xlsx (first sheet) as stripped strings, header first."""
    if not path.is_file():
        raise DatasetError(f"{path}: text table not found")
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                return [[cell(c) for c in row] for row in csv.reader(f)]
        import openpyxl
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            return [[cell(c) for c in row] for row in wb.worksheets[0].iter_rows(values_only=True)]
        finally:
            wb.close()
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"{path}: cannot read text table ({e}); save it as a UTF-8 .csv or an .xlsx") from e


def _no_column(path: Path, column: str, rows: list[list[str]], columns: str) -> DatasetError:
    """The error of a table without ``column``: its header as read, and the columns its first row must name."""
    return DatasetError(f"{path}: no {column} column (header: {rows[0] if rows else 'empty'}); its first row must "
                        f"name the columns: {columns}")


def read_table(path: Path, image_column: str = "image") -> list[Row]:
    """Rows of a text table with columns ``image_column``, text (or description/caption) [, split]."""
    rows = _read_rows(path)
    header = [h.lower() for h in rows[0]] if rows else []

    def col(names: Sequence[str], required: bool = True) -> int | None:
        idx = next((header.index(n) for n in names if n in header), None)
        if idx is None and required:
            raise _no_column(path, "/".join(names), rows, f"{image_column}, text [, split]")
        return idx

    i_img, i_txt, i_split = col((image_column,)), col(_TEXT_COLUMNS), col(("split",), required=False)
    get = lambda r, i: r[i] if i is not None and i < len(r) else ""  # noqa: E731
    out = [Row(path, f"row {n}", get(r, i_img), get(r, i_txt), get(r, i_split) if i_split is not None else None)
           for n, r in enumerate(rows[1:], start=2) if any(r)]
    if not out:
        raise DatasetError(f"{path}: text table is empty (no rows under the header)")
    return out


def read_column(path: Path, column: str) -> list[str]:
    """The non-empty cells of ``column`` of a .csv / .xlsx table, in order (a table of file names, say)."""
    rows = _read_rows(path)
    header = [h.lower() for h in rows[0]] if rows else []
    if column not in header:
        raise _no_column(path, column, rows, column)
    i = header.index(column)
    out = [r[i] for r in rows[1:] if i < len(r) and r[i]]
    if not out:
        raise DatasetError(f"{path}: no {column} under the header")
    return out


def text_table(d: Path) -> Path:
    found = [d / n for n in ("texts.csv", "texts.xlsx") if (d / n).is_file()]
    if len(found) != 1:
        raise DatasetError(f"{d}: expected exactly one of texts.csv / texts.xlsx, found {[p.name for p in found]}")
    return found[0]
