"""scripts/results_table.py: mean ± std over the subsets beside the paper's numbers, and the Fig. 3 tables."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
results_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_table)


def write_run(out: Path, name: str, dice: float, iou: float) -> None:
    (out / name / "eval-test").mkdir(parents=True)
    (out / name / "eval-test" / "summary.json").write_text(json.dumps({"dice": dice, "iou": iou}))
    config = {"size": 128, "blocks": [1, 10], "steps": [50, 150], "train_ids": ["a", "b", "c", "d", "e"],
              "fit": {"epochs": 50, "dim": 64}, "cache": "/x/cache/monuseg-abc"}
    (out / name / "config.json").write_text(json.dumps(config))


def test_table_gives_mean_and_sample_std_beside_the_paper(tmp_path):
    write_run(tmp_path, "textdiff-0", 0.70, 0.50)
    write_run(tmp_path, "textdiff-1", 0.74, 0.60)
    write_run(tmp_path, "unet-2", 0.60, 0.40)
    lines = results_table.table(tmp_path, "monuseg").splitlines()
    # mean 72.00, sample std sqrt(2 * 0.02^2 / 1) = 2.83; IoU 55.00 ± 7.07
    assert "| TextDiff | 72.00 ± 2.83 | 55.00 ± 7.07 | 0,1 | 78.67 | 64.98 |" in lines
    assert "| no text (ζ1) | — | — | — | 77.73 | — |" in lines
    assert "| U-Net baseline | 60.00 ± 0.00 | 40.00 ± 0.00 | 2 | 73.92 | 58.98 |" in lines
    assert any("Image size 128 px; blocks [1, 10] × steps [50, 150]; 5 training images; 50 epochs; "
               "head width 64; store monuseg-abc." in line for line in lines)
    assert not any("Fig. 3" in line for line in lines)


def test_fig3_tables_from_the_sweep_csv(tmp_path):
    (tmp_path / "sweep").mkdir()
    rows = [("block", "1", "", "yes", 0.2), ("block", "1", "", "no", 0.3), ("block", "10", "", "yes", 0.75),
            ("block", "10", "", "no", 0.76), ("step", "", "50", "yes", 0.71), ("step", "", "50", "no", 0.7),
            ("pair", "1", "50", "yes", 0.1), ("pair", "1", "50", "no", 0.11),
            ("pair", "10", "50", "yes", 0.7512), ("pair", "10", "50", "no", 0.74)]
    with (tmp_path / "sweep" / "sweep.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "block", "step", "text", "test_dice", "test_iou", "val_dice", "run"])
        w.writerows([(k, b, s, t, d, d, d, "runs/x") for k, b, s, t, d in rows])
    lines = results_table.table(tmp_path, "qata").splitlines()
    i = lines.index("| features | with text | without text |")
    assert lines[i + 2:i + 5] == ["| block 1 | 20.00 | 30.00 |", "| block 10 | 75.00 | 76.00 |",
                                  "| step 50 | 71.00 | 70.00 |"]
    j = lines.index("| block | step 50 |")
    assert lines[j + 2:j + 4] == ["| 1 | 10.00 / 11.00 |", "| 10 | 75.12 / 74.00 |"]
