"""The README's Python API example runs as written (extract → fit → evaluate → predict, synthetic set)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one python block"
    return blocks[0]


@pytest.mark.timeout(600)
def test_the_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(_example(), str(README), "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert re.search(r"test Dice 0\.\d{3}", printed) and "foreground" in printed
    runs = tmp_path / "runs" / "api"
    summary = (runs / "textdiff" / "eval-test" / "summary.json").read_text()
    assert '"n_images": 16' in summary
    mask = np.asarray(Image.open(runs / "new_mask.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
