"""Image helpers both stages use: ``dihedral`` gives the 8 views (rotations × flip) that extraction stores and
pretraining / the baseline sample; ``to_unit_range`` scales uint8 pixels to the UNet's [-1, 1]."""

from __future__ import annotations

import numpy as np


def dihedral(a: np.ndarray, view: int) -> np.ndarray:
    """View ``view`` (0..7) of the dihedral group on the last two axes: rot90 × (view % 4), then flip if ≥ 4."""
    out = np.rot90(a, k=view % 4, axes=(-2, -1))
    return np.ascontiguousarray(out[..., ::-1] if view >= 4 else out)


def to_unit_range(img8: np.ndarray) -> np.ndarray:
    """uint8 → float32 in [-1, 1], the UNet's input scale."""
    return img8.astype(np.float32) / 127.5 - 1.0
