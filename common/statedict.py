"""How a state dict differs from the one a model expects, in words (stage one's UNet checkpoints, stage two's
weights files alike). Standard library only: the tensors are compared by their ``shape``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["mismatch"]


def mismatch(expected: Mapping[str, Any], got: Mapping[str, Any], file: str = "file", limit: int = 3) -> list[str]:
    """Which keys of ``got`` are missing, unexpected or mis-shaped against ``expected`` (name → tensor): one
    phrase per kind, the first ``limit`` keys of each (``file``: what ``got`` is called); empty when it fits."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    misshaped = [f"{k}: {file} {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]

    def part(title: str, rows: list[str]) -> list[str]:
        more = f", ... {len(rows) - limit} more" if len(rows) > limit else ""
        return [f"{title} keys ({len(rows)}): {', '.join(rows[:limit])}{more}"] if rows else []

    return part("missing", missing) + part("unexpected", unexpected) + part("mis-shaped", misshaped)
