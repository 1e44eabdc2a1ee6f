"""scripts/compare_runs.py: runs paired by subset seed, images by id; hand-computed differences."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
sys.modules["compare_runs"] = compare_runs   # its dataclass looks its module up
spec.loader.exec_module(compare_runs)


def write_run(root: Path, name: str, seed: int, dice: dict[str, float]) -> Path:
    run = root / name
    (run / "eval-test").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"fit": {"subset_seed": seed}}))
    rows = ["id,dice,iou"] + [f"{k},{v},0" for k, v in dice.items()]
    (run / "eval-test" / "per_image.csv").write_text("\n".join(rows) + "\n")
    return run


def test_pairs_by_seed_and_image_id(tmp_path):
    # A's seed-1 run is listed first and its images in another order: pairing must not depend on either.
    a = [write_run(tmp_path, "a-1", 1, {"y": 0.5, "x": 0.9}), write_run(tmp_path, "a-0", 0, {"x": 0.8, "y": 0.6})]
    b = [write_run(tmp_path, "b-0", 0, {"x": 0.7, "y": 0.7}), write_run(tmp_path, "b-1", 1, {"x": 0.6, "y": 0.6}),
         write_run(tmp_path, "b-2", 2, {"x": 0.1, "y": 0.1})]          # no A run for seed 2: left out
    c = compare_runs.compare(a, b)
    assert c.seeds == [0, 1]
    # seed 0: x +0.1, y −0.1 → mean 0; seed 1: x +0.3, y −0.1 → mean +0.1; over subsets +0.05
    assert c.diffs[0] == pytest.approx([0.1, -0.1]) and c.diffs[1] == pytest.approx([0.3, -0.1])
    assert c.mean_diff == pytest.approx(0.05)
    assert c.mean_a == pytest.approx(0.7) and c.mean_b == pytest.approx(0.65)
    assert c.wins() == (2, 4)
    lo, hi = c.interval(n_boot=500)
    assert -0.1 - 1e-9 <= lo < 0.05 < hi <= 0.3 + 1e-9    # bounded by the extreme resamples
    text = compare_runs.report(c, n_boot=200)
    assert "A 70.00 vs B 65.00" in text and "A − B +5.00 points" in text and "0: +0.00, 1: +10.00" in text


def test_constant_difference_has_a_point_interval(tmp_path):
    a = [write_run(tmp_path, f"a-{s}", s, {"x": 0.8, "y": 0.5}) for s in (0, 1)]
    b = [write_run(tmp_path, f"b-{s}", s, {"x": 0.7, "y": 0.4}) for s in (0, 1)]
    assert compare_runs.compare(a, b).interval(n_boot=100) == pytest.approx((0.1, 0.1))


def test_mismatched_images_and_missing_files_are_named(tmp_path):
    a = [write_run(tmp_path, "a-0", 0, {"x": 0.8, "y": 0.5})]
    b = [write_run(tmp_path, "b-0", 0, {"x": 0.7, "z": 0.4})]
    with pytest.raises(SystemExit, match="subset 0: A and B were scored on different images"):
        compare_runs.compare(a, b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty/config.json: missing"):
        compare_runs.compare([tmp_path / "empty"], b)
    with pytest.raises(SystemExit, match="no subset seed in common"):
        compare_runs.compare(a, [write_run(tmp_path, "b-3", 3, {"x": 0.7, "y": 0.4})])
