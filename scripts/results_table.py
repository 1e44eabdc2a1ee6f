"""The tables of docs/results.md, from the committed evidence alone (``scripts/results.py`` writes it).

    python scripts/results_table.py results/ [--update docs/results.md]

Reads every ``results/<dataset>/<protocol>/`` (its ``protocol.json`` and each run's ``config.json``,
``metrics.json`` and ``eval-*/summary.json``): per protocol, test Dice / IoU mean ± std over the training subsets
for each method and mask resizing beside the paper's Tables 1 and 2, the validation Dice the choices rest on,
the variants (one setting changed), and, where runs were scored with other text (``evaluate --text``), how much
each relies on it; and Fig. 3 where a protocol keeps its ``pipeline sweep`` table (``sweep/sweep.csv``). Nothing
is computed but means: anyone can regenerate the tables from a clone.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, by a bare python3 too
sys.path.insert(0, str(Path(__file__).resolve().parent))     # compare_runs beside it
from train.runs import rundir  # noqa: E402  (the standard library only)

METHODS = {"textdiff": "TextDiff", "notext": "no text (ζ1)", "concat": "concat fusion (ζ2)", "unet": "U-Net baseline"}
#: the paper's Tables 1 and 2 (Dice / IoU %; Table 2 gives Dice only), under the authors' mask resizing
PAPER = {
    "monuseg": {"textdiff": (78.67, 64.98), "notext": (77.73, None), "concat": (76.34, None), "unet": (73.92, 58.98)},
    "qata": {"textdiff": (71.41, 59.03), "notext": (68.90, None), "concat": (70.71, None), "unet": (46.08, 34.16)},
}
#: our first, shrunken measurements (issue 7: MoNuSeg at 128 px, QaTa-COV19 at 64 px with 5 epochs; nearest
#: masks, so shown on the nearest rows), test Dice % mean over 3 subsets, as reported then (docs/results-history.md;
#: their run folders were not kept)
EARLIER = {
    "monuseg": {"textdiff": 73.34, "notext": 73.73, "concat": 74.21, "unet": 57.66},
    "qata": {"textdiff": 64.17, "notext": 59.88, "concat": 65.25, "unet": 52.85},
}
TEXT_MODES = {"as-is": "its own text", "none": "no text", "shuffled": "another image's text",
              "mirrored": "mirrored text"}


def mean_std(values: list[float]) -> str:
    """``mean ± std`` in % (— for none; std 0 for one value)."""
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_runs(folder: Path) -> list[dict[str, Any]]:
    """Each run's evidence in ``folder``: name, group (the name without masks and seed), masks, seed, the fit
    settings, the best validation Dice and each evaluation's summary by (split, text mode, test-time augmentation)."""
    runs = []
    for run in sorted(p for p in folder.iterdir() if (p / rundir.CONFIG).is_file() and "." not in p.name):
        group, masks, seed = run.name.rsplit("-", 2)
        config, metrics = _json(run / rundir.CONFIG), _json(run / rundir.METRICS) or {}
        evals = {}
        for d in sorted(run.glob(f"{rundir.EVAL_PREFIX}*")):
            summary = _json(d / rundir.SUMMARY)
            if summary:
                evals[(summary.get("split", d.name.removeprefix(rundir.EVAL_PREFIX).split("-")[0]),
                       summary.get("text", "as-is"), summary.get("tta", "none"))] = summary
        runs.append({"name": run.name, "group": group, "masks": masks, "seed": int(seed), "config": config,
                     "val": metrics.get("best_val_dice"), "evals": evals, "store": _json(run / "store.json") or {}})
    return runs


def _cells(runs: list[dict[str, Any]], split: str = "test", text: str = "as-is") -> tuple[str, str, str, str]:
    """(test Dice, test IoU, validation Dice, subsets) of a group of runs."""
    scored = [r["evals"][(split, text, "none")] for r in runs if (split, text, "none") in r["evals"]]
    vals = [r["val"] for r in runs if r["val"] is not None]
    seeds = ",".join(str(r["seed"]) for r in runs)
    return (mean_std([s["dice"] for s in scored]), mean_std([s["iou"] for s in scored]), mean_std(vals),
            seeds or "—")


def describe(proto: dict[str, Any]) -> str:
    """The protocol in one paragraph: its own ``about`` and how every run is chosen and scored."""
    return (f"{proto.get('about', '')} Mean ± std over the training subsets; best epoch by validation Dice; the "
            f"test split scored once per configuration; — where no run has evidence yet.").strip()


def protocol_table(folder: Path) -> list[str]:
    """The tables of one protocol folder."""
    proto = json.loads((folder / "protocol.json").read_text())
    dataset = proto["dataset"]
    every = read_runs(folder)
    runs = one_content(every)
    chosen = proto.get("scored_tta", "none")
    extra = f" test Dice % with TTA {chosen} |" if chosen != "none" else ""
    out = [f"### {dataset} · {folder.name}", "", describe(proto), "",
           "| method | masks | test Dice % | test IoU % | val Dice % | subsets | paper Dice % | paper IoU % |"
           " earlier Dice % |" + extra, "|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else "")]
    for method, name in METHODS.items():
        for masks in proto["masks"]:
            group = [r for r in runs if r["group"] == method and r["masks"] == masks]
            if method not in proto["methods"]:
                continue
            dice, iou, val, seeds = _cells(group)
            paper_dice, paper_iou = PAPER.get(dataset, {}).get(method, (None, None))
            earlier = EARLIER.get(dataset, {}).get(method) if masks == "nearest" else None
            with_tta = ([r["evals"][("test", "as-is", chosen)]["dice"] for r in group
                         if ("test", "as-is", chosen) in r["evals"]] if extra else [])
            out.append(f"| {name} | {masks} | {dice} | {iou} | {val} | {seeds} | {_num(paper_dice)} | "
                       f"{_num(paper_iou)} | {_num(earlier)} |" + (f" {mean_std(with_tta)} |" if extra else ""))
    return (out + contents(every, runs) + paired(folder, proto, runs) + variants(proto, runs) + reliance(runs)
            + tta(proto, runs) + fig3(folder / "sweep" / "sweep.csv"))


def _by_content(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The runs grouped by the store content they were fitted on (one digest; or digests whose sketches agree:
    the same content up to a CPU's rounding, as ``results.py`` decides it), the largest group first (ties: the
    one with a sketch)."""
    from results import other_content

    groups: list[list[dict[str, Any]]] = []
    for r in runs:
        for g in groups:
            if other_content(r["store"], g[0]["store"]) is None:
                g.append(r)
                break
        else:
            groups.append([r])
    return sorted(groups, key=lambda g: (-len(g), "sketch" not in g[0]["store"]))


def one_content(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of the table's one store content (:func:`_by_content`'s first group)."""
    groups = _by_content(runs)
    return groups[0] if groups else []


def contents(every: list[dict[str, Any]], shown: list[dict[str, Any]]) -> list[str]:
    """Which store content each run was fitted on, where the runs have more than one (one key rebuilt on other
    CPUs: their digests differ; the sketch says whether that is rounding alone); the tables use one."""
    groups, names = _by_content(every), {r["name"] for r in shown}
    if len(groups) < 2:
        return []
    rows = ["", "Store contents: one key, rebuilt on other machines, other bits. The tables of this protocol use "
                "the first (the most runs); `results.py` refits a run wherever its store's content is not the run's.",
            "",
            "| content | computed on | runs | in the tables |", "|---|---|---|---|"]
    for g in groups:
        facts = g[0]["store"]
        digests = sorted({str(r["store"].get("content_digest", "?"))[:12] for r in g})
        rows.append(f"| {', '.join(digests)} | {facts.get('cpu', 'not recorded')} | "
                    f"{', '.join(r['name'] for r in g)} | {'yes' if g[0]['name'] in names else 'no'} |")
    return rows


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def paired(folder: Path, proto: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """TextDiff against no text (ζ1), paired by subset and image (``scripts/compare_runs.py``), per mask resizing
    where both were scored on a common subset."""
    from compare_runs import compare

    rows = []
    for masks in proto["masks"]:
        sides = [[folder / r["name"] for r in runs if r["group"] == m and r["masks"] == masks
                  and ("test", "as-is", "none") in r["evals"]] for m in ("textdiff", "notext")]
        seeds = [{int(p.name.rsplit("-", 1)[1]) for p in side} for side in sides]
        if not seeds[0] & seeds[1]:
            continue
        c = compare(*[[p for p in side if int(p.name.rsplit("-", 1)[1]) in seeds[0] & seeds[1]] for side in sides])
        lo, hi = c.interval()
        won, total = c.wins()
        rows.append(f"| {masks} | {100 * c.mean_diff:+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
                    f"{','.join(map(str, c.seeds))} | {won} of {total} |")
    if not rows:
        return []
    return ["", "Text against no text, paired by subset and image (`scripts/compare_runs.py`: mean test Dice "
                "difference in points, 95 % two-level bootstrap interval):", "",
            "| masks | TextDiff − ζ1 | 95 % interval | subsets | images where TextDiff is ahead |",
            "|---|---|---|---|---|", *rows]


def variants(proto: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """One row per variant of the protocol and mask resizing: what it changes, validation and test Dice."""
    if not proto.get("variants"):
        return []
    rows = ["", "Variants (one setting changed from the method's row above):", "",
            "| variant | method | changes | masks | val Dice % | test Dice % | subsets |", "|---|---|---|---|---|---|---|"]
    for name, var in proto["variants"].items():
        for masks in var.get("masks", proto["masks"]):
            group = [r for r in runs if r["group"] == name and r["masks"] == masks]
            dice, _, val, seeds = _cells(group)
            changes = ", ".join(f"{k} {v}" for k, v in var.get("settings", {}).items()) or "—"
            rows.append(f"| {name} | {METHODS[var['method']]} | {changes} | {masks} | {val} | {dice} | {seeds} |")
    return rows


def reliance(runs: list[dict[str, Any]]) -> list[str]:
    """Test Dice % of each run group scored with other text (``evaluate --text``), when any was."""
    groups = sorted({(r["group"], r["masks"]) for r in runs if any(m != "as-is" for _, m, _ in r["evals"])})
    if not groups:
        return []
    rows = ["", "Reliance on text: test Dice % given its own text, none (every token withheld), another image's, or "
                "its own mirrored (`evaluate --text`).", "",
            "| run | masks | " + " | ".join(TEXT_MODES.values()) + " | subsets |", "|---" * (len(TEXT_MODES) + 3) + "|"]
    for group, masks in groups:
        members = [r for r in runs if r["group"] == group and r["masks"] == masks]
        cells = [_cells(members, "test", mode)[0] for mode in TEXT_MODES]
        rows.append(f"| {group} | {masks} | " + " | ".join(cells) + f" | {_cells(members)[3]} |")
    return rows


def tta(proto: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """Validation Dice % of each run group without and with each of the protocol's test-time augmentations
    (``evaluate --split val --tta``), the same weights each time, over the subsets that have them all."""
    modes = list(proto.get("tta", []))
    groups = sorted({(r["group"], r["masks"]) for r in runs if any(t != "none" for *_, t in r["evals"])})
    if not modes or not groups:
        return []
    rows = ["", "Test-time augmentation, on validation only (the best epoch's weights; val Dice %, mean ± std over "
                "the subsets scored with every mode; gain: the mean paired difference in points):", "",
            "| run | masks | none | " + " | ".join(modes) + " | " + " | ".join(f"gain {m}" for m in modes)
            + " | subsets |", "|---" * (2 * len(modes) + 4) + "|"]
    for group, masks in groups:
        members = [r for r in runs if r["group"] == group and r["masks"] == masks and r["val"] is not None
                   and all(("val", "as-is", m) in r["evals"] for m in modes)]
        if not members:
            continue
        with_tta = {m: [r["evals"][("val", "as-is", m)]["dice"] for r in members] for m in modes}
        plain = [r["val"] for r in members]
        gains = [f"{100 * statistics.mean(a - b for a, b in zip(with_tta[m], plain)):+.2f}" for m in modes]
        rows.append(f"| {group} | {masks} | {mean_std(plain)} | " + " | ".join(mean_std(with_tta[m]) for m in modes)
                    + " | " + " | ".join(gains) + f" | {','.join(str(r['seed']) for r in members)} |")
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


def tables(results: Path) -> str:
    """Every protocol's tables under ``results`` (``<dataset>/<protocol>/``), datasets and protocols sorted."""
    folders = sorted(p.parent for p in Path(results).glob("*/*/protocol.json"))
    return "\n\n".join("\n".join(protocol_table(f)) for f in folders)


BEGIN, END = "<!-- results_table.py results/ -->", "<!-- /results_table.py -->"


def update(doc: Path, text: str) -> None:
    """Replace the block between the markers of ``doc`` (docs/results.md) with ``text``."""
    page = doc.read_text()
    if page.count(BEGIN) != 1 or page.count(END) != 1:
        raise SystemExit(f"error: {doc}: needs one {BEGIN} and one {END}")
    head, rest = page.split(BEGIN)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END)[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="The results folder (results/ of the repository).")
    ap.add_argument("--update", type=Path, help="Also write the tables into this page's marked block "
                                                "(docs/results.md).")
    args = ap.parse_args()
    text = tables(args.results)
    if args.update:
        update(args.update, text)
    print(text)


if __name__ == "__main__":
    main()
