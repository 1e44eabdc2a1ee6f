"""The results table of scripts/results.sh: ours (mean ± std over the training subsets) beside the paper's.

    python scripts/results_table.py runs/results/monuseg --dataset monuseg

Reads OUT/<method>-<seed>/eval-test/summary.json and each run's config.json (for what was run),
OUT/<run>/eval-test-text-<mode>/summary.json (the text-reliance table: ``evaluate --text``, TextDiff and its
``--text-dropout`` runs OUT/textdrop<P>-<seed>, and OUT/textdrop<P>own-<seed> fitted with
``--dropout-classifier own``) and OUT/sweep/sweep.csv (Fig. 3) when the sweep was run.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, by a bare python3 too
from train.runs import rundir  # noqa: E402  (the standard library only)

METHODS = {"textdiff": "TextDiff", "notext": "no text (ζ1)", "concat": "concat fusion (ζ2)", "unet": "U-Net baseline"}
# The paper's Tables 1 and 2 (Dice / IoU %); Table 2 gives Dice only.
PAPER = {
    "monuseg": {"textdiff": (78.67, 64.98), "notext": (77.73, None), "concat": (76.34, None), "unet": (73.92, 58.98)},
    "qata": {"textdiff": (71.41, 59.03), "notext": (68.90, None), "concat": (70.71, None), "unet": (46.08, 34.16)},
}


TEXT_MODES = {"as-is": "its own text", "none": "no text", "shuffled": "another image's text",
              "mirrored": "mirrored text"}


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def read_runs(out: Path, prefix: str, name: Path | str) -> tuple[list[dict], str]:
    """The JSON file ``name`` (relative to a run) of each run OUT/<prefix>-<seed> that has it, and their seeds."""
    runs = [r for r in sorted(out.glob(f"{prefix}-*")) if (r / name).is_file()]
    return [rundir.read_json(r / name) for r in runs], ",".join(r.name.rsplit("-", 1)[1] for r in runs)


def scored(out: Path, prefix: str, text: str = "as-is") -> tuple[list[dict], str]:
    """The test summaries of the runs OUT/<prefix>-<seed> scored with text mode ``text``, and their seeds."""
    return read_runs(out, prefix, rundir.eval_dir(Path(), "test", text) / rundir.SUMMARY)


def table(out: Path, dataset: str) -> str:
    rows = ["| method | Dice % (ours) | IoU % (ours) | subsets | Dice % (paper) | IoU % (paper) |",
            "|---|---|---|---|---|---|"]
    for key, name in METHODS.items():
        summaries, seeds = scored(out, key)
        dice = [s["dice"] for s in summaries]
        iou = [s["iou"] for s in summaries]
        paper_dice, paper_iou = PAPER[dataset][key]
        rows.append(f"| {name} | {mean_std(dice)} | {mean_std(iou)} | {seeds or '—'} | {paper_dice:.2f} | "
                    f"{'—' if paper_iou is None else f'{paper_iou:.2f}'} |")
    example = next(iter(sorted(out.glob(f"textdiff-*/{rundir.CONFIG}"))), None)
    if example:
        cfg = rundir.read_json(example)
        fit = cfg["fit"]
        rows += ["", f"Image size {cfg['size']} px; blocks {cfg['blocks']} × steps {cfg['steps']}; "
                     f"{len(cfg['train_ids'])} training images; {fit['epochs']} epochs; head width {fit['dim']}; "
                     f"store {Path(cfg['cache']).name}."]
    return "\n".join(rows + reliance(out) + view_text(out) + fig3(out / "sweep" / "sweep.csv"))


def view_text(out: Path) -> list[str]:
    """Best validation Dice % of TextDiff under each view-text policy (``fit --view-text``; ``same`` is the
    TextDiff runs), when any other policy was fitted: the choice is made on these numbers, never on test."""
    policies = sorted({r.name.rsplit("-", 1)[0][4:] for r in out.glob("view*-*") if (r / rundir.METRICS).is_file()})
    if not policies:
        return []
    rows = ["", "Text of the augmented views (`fit --view-text`): best validation Dice % (mean ± std over the "
                "subsets; the test split is not scored for this choice).", "",
            "| policy | validation Dice % | subsets |", "|---|---|---|"]
    for policy, prefix in [("same", "textdiff")] + [(p, f"view{p}") for p in policies]:
        metrics, seeds = read_runs(out, prefix, rundir.METRICS)
        rows.append(f"| {policy} | {mean_std([m['best_val_dice'] for m in metrics])} | {seeds or '—'} |")
    return rows


OWN = "own"  # textdrop<P>own: fitted with --dropout-classifier own


def dropout_name(prefix: str) -> str:
    """The table's name of the runs textdrop<P>[own]."""
    p = prefix[8:].removesuffix(OWN)
    return f"TextDiff, text dropout {p}" + (", own no-text classifier" if prefix.endswith(OWN) else "")


def reliance(out: Path) -> list[str]:
    """Test Dice % of TextDiff and its text-dropout runs given each kind of text (``evaluate --text``), beside
    the no-text model (ζ1) — when any run was scored with another text mode."""
    if not any(out.glob("*-*/eval-test-text-*")):
        return []
    drops = sorted({r.name.rsplit("-", 1)[0] for r in out.glob("textdrop*-*")},
                   key=lambda p: (p.endswith(OWN), float(p[8:].removesuffix(OWN))))
    models = [("textdiff", "TextDiff")] + [(p, dropout_name(p)) for p in drops]
    rows = ["", "Reliance on text: test Dice % given its own text, none (every token withheld), another image's "
                "(`--text shuffled`), or its own with left ↔ right and upper ↔ lower swapped (`--text mirrored`); "
                "mean ± std over the subsets.", "",
            "| model | " + " | ".join(TEXT_MODES.values()) + " | subsets |", "|---" * (len(TEXT_MODES) + 2) + "|"]
    for prefix, name in models:
        by_mode = {mode: scored(out, prefix, mode) for mode in TEXT_MODES}
        cells = [mean_std([s["dice"] for s in summaries]) for summaries, _ in by_mode.values()]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {by_mode['as-is'][1] or '—'} |")
    notext, seeds = scored(out, "notext")
    rows.append("| no text (ζ1) | — | " + mean_std([s["dice"] for s in notext]) + " | — | — | " + (seeds or "—") + " |")
    return rows


def fig3(csv_path: Path) -> list[str]:
    """The Fig. 3 sweep (``pipeline sweep``), when it was run: test Dice % per single block / step, ± text;
    and with ``--grid``, per (block, step) pair."""
    if not csv_path.is_file():
        return []
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if "block" not in (reader.fieldnames or []):
        return ["", f"Fig. 3: {csv_path} was written by an older `pipeline sweep` (no block / step columns); "
                    "run the sweep again: it reuses every finished fit and rewrites the table."]
    dice = {(r["block"], r["step"], r["text"]): 100 * float(r["test_dice"]) for r in rows}
    blocks = sorted({r["block"] for r in rows if r["block"]}, key=int)
    steps = sorted({r["step"] for r in rows if r["step"]}, key=int)
    nan = float("nan")
    out = ["", "Fig. 3 (one subset, seed 0): test Dice % with each block alone (all steps) and each step alone "
               "(all blocks); `sweep/sweep.png` is the heat-map.", "",
           "| features | with text | without text |", "|---|---|---|"]
    for label, b, t in [(f"block {b}", b, "") for b in blocks] + [(f"step {t}", "", t) for t in steps]:
        out.append(f"| {label} | {dice.get((b, t, 'yes'), nan):.2f} | {dice.get((b, t, 'no'), nan):.2f} |")
    if any(r["kind"] == "pair" for r in rows):
        out += ["", "Each block with each step alone (`pipeline sweep --grid`; `sweep/grid.png`), test Dice % "
                    "with text / without text:", "",
                "| block | " + " | ".join(f"step {t}" for t in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for b in blocks:
            cells = [f"{dice.get((b, t, 'yes'), nan):.2f} / {dice.get((b, t, 'no'), nan):.2f}" for t in steps]
            out.append(f"| {b} | " + " | ".join(cells) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dataset", choices=sorted(PAPER), required=True)
    args = ap.parse_args()
    print(table(args.out, args.dataset))


if __name__ == "__main__":
    main()
