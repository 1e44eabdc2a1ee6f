"""scripts/results_table.py: mean ± std over the subsets beside the paper's numbers, from committed evidence
alone, and docs/results.md holds exactly its tables."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
results_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_table)
BEGIN, END = results_table.BEGIN, results_table.END


def write_run(folder: Path, name: str, dice: float, iou: float, val: float) -> None:
    (folder / name / "eval-test").mkdir(parents=True)
    (folder / name / "eval-test" / "summary.json").write_text(json.dumps({"dice": dice, "iou": iou, "split": "test",
                                                                          "text": "as-is"}))
    (folder / name / "config.json").write_text(json.dumps({"fit": {"epochs": 50, "dim": 64}}))
    (folder / name / "metrics.json").write_text(json.dumps({"best_val_dice": val}))


def test_table_gives_mean_and_sample_std_beside_the_paper(tmp_path):
    folder = tmp_path / "monuseg" / "p"
    folder.mkdir(parents=True)
    (folder / "protocol.json").write_text(json.dumps({
        "dataset": "monuseg", "unet": {"name": "adm-imagenet-256"}, "extract": {"size": 256, "blocks": [6]},
        "fit": {"epochs": 50, "dim": 64}, "methods": ["textdiff", "notext", "unet"], "masks": ["authors", "nearest"],
        "seeds": [0, 1]}))
    write_run(folder, "textdiff-authors-0", 0.70, 0.50, 0.6)
    write_run(folder, "textdiff-authors-1", 0.74, 0.60, 0.8)
    write_run(folder, "unet-authors-1", 0.60, 0.40, 0.5)
    lines = results_table.tables(tmp_path).splitlines()
    # mean 72.00, sample std sqrt(2 * 0.02^2 / 1) = 2.83; IoU 55.00 ± 7.07; validation 70.00 ± 14.14
    assert "| TextDiff | authors | 72.00 ± 2.83 | 55.00 ± 7.07 | 70.00 ± 14.14 | 0,1 | 78.67 | 64.98 | — |" in lines
    assert "| no text (ζ1) | authors | — | — | — | — | 77.73 | — | — |" in lines
    assert "| U-Net baseline | authors | 60.00 ± 0.00 | 40.00 ± 0.00 | 50.00 ± 0.00 | 1 | 73.92 | 58.98 | — |" in lines
    assert "| TextDiff | nearest | — | — | — | — | 78.67 | 64.98 | 73.34 |" in lines  # the earlier: nearest masks
    assert not any("concat" in line for line in lines) and not any("Fig. 3" in line for line in lines)


def test_fig3_tables_from_the_sweep_csv(tmp_path):
    folder = tmp_path / "qata" / "p"
    (folder / "sweep").mkdir(parents=True)
    (folder / "protocol.json").write_text(json.dumps({"dataset": "qata", "unet": {"name": "x"}, "extract": {},
                                                      "methods": [], "masks": [], "seeds": []}))
    rows = [("block", "1", "", "yes", 0.2), ("block", "1", "", "no", 0.3), ("block", "10", "", "yes", 0.75),
            ("block", "10", "", "no", 0.76), ("step", "", "50", "yes", 0.71), ("step", "", "50", "no", 0.7),
            ("pair", "1", "50", "yes", 0.1), ("pair", "1", "50", "no", 0.11),
            ("pair", "10", "50", "yes", 0.7512), ("pair", "10", "50", "no", 0.74)]
    with (folder / "sweep" / "sweep.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "block", "step", "text", "test_dice", "test_iou", "val_dice", "run"])
        w.writerows([(k, b, s, t, d, d, d, "runs/x") for k, b, s, t, d in rows])
    lines = results_table.tables(tmp_path).splitlines()
    i = lines.index("| features | with text | without text |")
    assert lines[i + 2:i + 5] == ["| block 1 | 20.00 | 30.00 |", "| block 10 | 75.00 | 76.00 |",
                                  "| step 50 | 71.00 | 70.00 |"]
    j = lines.index("| block | step 50 |")
    assert lines[j + 2:j + 4] == ["| 1 | 10.00 / 11.00 |", "| 10 | 75.12 / 74.00 |"]


def test_docs_results_holds_exactly_the_tables_of_the_committed_evidence():
    """`python scripts/results_table.py results/` prints the block of docs/results.md between its markers."""
    printed = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), str(ROOT / "results")],
                             capture_output=True, text=True, check=True).stdout
    doc = (ROOT / "docs" / "results.md").read_text()
    assert doc.count(BEGIN) == 1 and doc.count(END) == 1
    assert doc.split(BEGIN)[1].split(END)[0].strip("\n") == printed.strip("\n")


def test_text_against_no_text_is_paired_by_subset_and_image(tmp_path):
    folder = tmp_path / "qata" / "p"
    folder.mkdir(parents=True)
    (folder / "protocol.json").write_text(json.dumps({
        "dataset": "qata", "unet": {"name": "x"}, "extract": {}, "methods": ["textdiff", "notext"],
        "masks": ["authors"], "seeds": [0, 1]}))
    dice = {("textdiff", 0): (0.8, 0.6), ("textdiff", 1): (0.7, 0.7), ("notext", 0): (0.7, 0.6), ("notext", 1): (0.6, 0.5)}
    for (method, seed), (a, b) in dice.items():
        name = f"{method}-authors-{seed}"
        write_run(folder, name, (a + b) / 2, 0.5, 0.5)
        (folder / name / "config.json").write_text(json.dumps({"fit": {"subset_seed": seed}}))
        (folder / name / "eval-test" / "per_image.csv").write_text(f"id,dice\nx,{a}\ny,{b}\n")
    lines = results_table.tables(tmp_path).splitlines()
    # subset 0: +0.10, 0.00 (mean +0.05); subset 1: +0.10, +0.20 (mean +0.15): +10 points; ahead on 3 of 4
    row = next(line for line in lines if line.startswith("| authors | "))
    assert row.startswith("| authors | +10.00 | [") and row.endswith("| 0,1 | 3 of 4 |")


def test_the_tables_use_one_store_content() -> None:
    """Runs fitted on two contents of one key: the tables use the larger group (digests whose sketches agree
    count as one content), and say which runs they leave out."""
    sketch = {"train/image": [10.0, 1.0, 2.0, 3.0]}
    near = {"train/image": [10.0, 1.0 + 1e-6, 2.0, 3.0]}  # another CPU's rounding
    other = {"train/image": [12.0, 5.0, 2.0, 3.0]}
    runs = [{"name": "a-authors-0", "store": {"content_digest": "aa", "sketch": sketch}},
            {"name": "a-authors-1", "store": {"content_digest": "bb", "sketch": near}},
            {"name": "a-authors-2", "store": {"content_digest": "cc", "sketch": other, "cpu": "X"}},
            {"name": "b-authors-0", "store": {"content_digest": "dd"}}]
    shown = results_table.one_content(runs)
    assert [r["name"] for r in shown] == ["a-authors-0", "a-authors-1"]
    lines = results_table.contents(runs, shown)
    assert "| aa, bb | not recorded | a-authors-0, a-authors-1 | yes |" in lines
    assert "| cc | X | a-authors-2 | no |" in lines and "| dd | not recorded | b-authors-0 | no |" in lines
    assert results_table.contents(runs[:2], results_table.one_content(runs[:2])) == []  # one content: no table
