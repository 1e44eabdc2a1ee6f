"""scripts/results.sh: what it runs, that it resumes, and that UNET / TEXT choose the encoders.

The stages are replaced by a stub ``pipeline`` (``PIPELINE=``) that logs its arguments and writes the
files the script looks for; the stages themselves are tested elsewhere.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = '''import hashlib, json, sys
from pathlib import Path
args = sys.argv[1:]
with open(LOG, "a") as f:
    f.write(json.dumps(args) + "\\n")
def opt(name):
    return args[args.index(name) + 1]
cmd = args[0]
if cmd == "pretrain":
    Path(opt("--out")).mkdir(parents=True, exist_ok=True)
    (Path(opt("--out")) / "model.pt").write_text("")
    (Path(opt("--out")) / "samples.png").write_text("")  # written once the last iteration is
elif cmd == "extract":
    print("progress line")
    print(opt("--cache-dir") + "/store.zarr")
elif cmd in ("fit", "baseline"):
    Path(opt("--out")).mkdir(parents=True, exist_ok=True)
    (Path(opt("--out")) / "INCOMPLETE").unlink(missing_ok=True)
    (Path(opt("--out")) / "config.json").write_text(json.dumps({"fit": {"epochs": 1, "dim": 8}, "size": 32,
        "blocks": [1], "steps": [50], "train_ids": ["a"], "cache": "store.zarr"}))
    (Path(opt("--out")) / "model.safetensors").write_text("weights of " + opt("--out"))
    (Path(opt("--out")) / "metrics.json").write_text(json.dumps({"best_val_dice": 0.5}))
elif cmd == "evaluate":
    mode = opt("--text") if "--text" in args else "as-is"
    folder = Path(args[1]) / ("eval-test" if mode == "as-is" else f"eval-test-text-{mode}")
    folder.mkdir(exist_ok=True)
    dice = {"as-is": 0.5, "none": 0.3, "shuffled": 0.35, "mirrored": 0.45}[mode]
    weights = hashlib.sha256((Path(args[1]) / "model.safetensors").read_bytes()).hexdigest()
    (folder / "summary.json").write_text(json.dumps({"dice": dice, "iou": 0.4, "text": mode,
                                                     "weights_sha256": weights}))
'''


@pytest.fixture()
def stub(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "log.jsonl"
    script = tmp_path / "pipeline"
    script.write_text(f"#!{sys.executable}\nLOG = {str(log)!r}\n" + STUB)
    script.chmod(0o755)
    return script, log


def run(stub: tuple[Path, Path], out: Path, dataset: str = "qata", **env: str) -> list[list[str]]:
    script, log = stub
    log.write_text("")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "results.sh"), dataset, str(out)], cwd=ROOT,
                         env={**os.environ, "PIPELINE": str(script), "SEEDS": "0 1", **env},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "| TextDiff | 50.00 ± 0.00 | 40.00 ± 0.00 | 0,1 | 71.41 | 59.03 |" in res.stdout
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_first_run_pretrains_extracts_fits_and_evaluates_every_method(stub, tmp_path):
    calls = run(stub, tmp_path / "out")
    assert [c[0] for c in calls[:2]] == ["pretrain", "extract"]
    assert calls[1][calls[1].index("--unet") + 1] == str(tmp_path / "out" / "unet-pretrained")
    assert calls[1][calls[1].index("--text-encoder") + 1] == "minilm"
    fits = [c for c in calls if c[0] in ("fit", "baseline")]
    assert [(c[0], c[c.index("--out") + 1].rsplit("/", 1)[1]) for c in fits] == [
        (cmd, f"{m}-{s}") for s in (0, 1) for cmd, m in
        (("fit", "textdiff"), ("fit", "notext"), ("fit", "concat"), ("baseline", "unet"), ("fit", "textdrop0.25"),
         ("fit", "textdrop0.5"))]
    assert all(c[c.index("--cache") + 1] == str(tmp_path / "out" / "cache" / "store.zarr") for c in fits)
    assert "--no-text" in fits[1] and fits[2][fits[2].index("--fusion") + 1] == "concat"
    assert [c[c.index("--text-dropout") + 1] for c in fits if "--text-dropout" in c] == ["0.25", "0.5"] * 2
    evaluations = [(Path(c[1]).name, c[c.index("--text") + 1] if "--text" in c else "as-is")
                   for c in calls if c[0] == "evaluate"]
    assert len(evaluations) == 2 * (6 + 3 * 3)  # every run as-is; the three text-reading runs under 3 modes
    assert {(f"{run}-0", mode) for run in ("textdiff", "textdrop0.25", "textdrop0.5")
            for mode in ("none", "shuffled", "mirrored")} < set(evaluations)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| TextDiff, text dropout 0.5 | 50.00 ± 0.00 | 30.00 ± 0.00 | 35.00 ± 0.00 | 45.00 ± 0.00 | 0,1 |" in table
    assert "| no text (ζ1) | — | 50.00 ± 0.00 | — | — | 0,1 |" in table


def test_second_run_skips_finished_work(stub, tmp_path):
    run(stub, tmp_path / "out")
    (tmp_path / "out" / "concat-1" / "INCOMPLETE").write_text("")  # a fit killed before it finished
    (tmp_path / "out" / "textdiff-0" / "eval-test-text-shuffled" / "summary.json").unlink()
    calls = run(stub, tmp_path / "out")
    assert [c[0] for c in calls] == ["extract", "evaluate", "fit", "evaluate"]
    assert calls[1][1].endswith("textdiff-0") and calls[1][calls[1].index("--text") + 1] == "shuffled"
    assert calls[2][calls[2].index("--out") + 1].endswith("concat-1")


def test_an_evaluation_of_other_weights_is_redone(stub, tmp_path):
    """A run whose weights changed after its evaluations (a swapped model.safetensors) is evaluated again, in
    every text mode: the committed scores are of the weights in the folder."""
    run(stub, tmp_path / "out")
    (tmp_path / "out" / "textdiff-1" / "model.safetensors").write_text("other weights")
    calls = run(stub, tmp_path / "out")
    assert [c[0] for c in calls[1:]] == ["evaluate"] * 4
    assert {Path(c[1]).name for c in calls[1:]} == {"textdiff-1"}


def test_dropout_runs_with_either_classifier(stub, tmp_path):
    """DROPOUT_CLASSIFIERS="shared own": textdrop<P>-<seed> with --dropout-classifier shared, textdrop<P>own-<seed>
    with own; each scored under the text modes and named apart in the table."""
    calls = run(stub, tmp_path / "out", METHODS="textdiff", DROPOUT="0.5", DROPOUT_CLASSIFIERS="shared own",
                TEXT_MODES="none")
    fits = {Path(c[c.index("--out") + 1]).name: c[c.index("--dropout-classifier") + 1]
            for c in calls if c[0] == "fit" and "--text-dropout" in c}
    assert fits == {f"textdrop0.5{c}-{s}": c or "shared" for c in ("", "own") for s in (0, 1)}
    assert {Path(c[1]).name for c in calls if c[0] == "evaluate" and "--text" in c} == {
        f"{r}-{s}" for r in ("textdiff", "textdrop0.5", "textdrop0.5own") for s in (0, 1)}
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| TextDiff, text dropout 0.5 | 50.00 ± 0.00 | 30.00 ± 0.00 | — | — | 0,1 |" in table
    assert "| TextDiff, text dropout 0.5, own no-text classifier | 50.00 ± 0.00 | 30.00 ± 0.00 | — | — | 0,1 |" in table


def test_an_interrupted_pretraining_is_resumed(stub, tmp_path):
    """A killed pretraining leaves model.pt (its checkpoint) but no samples.png: the next run resumes it."""
    run(stub, tmp_path / "out")
    (tmp_path / "out" / "unet-pretrained" / "samples.png").unlink()
    calls = run(stub, tmp_path / "out")
    assert [c[0] for c in calls] == ["pretrain", "extract"] and "--resume" in calls[0]


def test_methods_dropout_and_text_modes_can_be_narrowed(stub, tmp_path):
    calls = run(stub, tmp_path / "out", METHODS="textdiff notext", DROPOUT="0.5", TEXT_MODES="none")
    assert [(c[0], Path(c[c.index("--out") + 1] if "--out" in c else c[1]).name, "--text" in c) for c in calls[2:]] == [
        (cmd, f"{run}-{s}", text) for s in (0, 1) for cmd, run, text in
        (("fit", "textdiff", False), ("evaluate", "textdiff", False), ("fit", "notext", False),
         ("evaluate", "notext", False), ("fit", "textdrop0.5", False), ("evaluate", "textdrop0.5", False),
         ("evaluate", "textdiff", True), ("evaluate", "textdrop0.5", True))]


def test_a_given_unet_and_text_encoder_are_used_without_pretraining(stub, tmp_path):
    calls = run(stub, tmp_path / "out", UNET="adm-imagenet-256", TEXT="bioclinicalbert", SIZE="256")
    assert calls[0][0] == "extract"
    extract = calls[0]
    assert [extract[extract.index(k) + 1] for k in ("--unet", "--text-encoder", "--size")] == [
        "adm-imagenet-256", "bioclinicalbert", "256"]


def test_the_sweep_can_run_on_a_cluster(stub, tmp_path):
    script, log = stub

    def sweep_call(out: Path, **env: str) -> list[str]:
        log.write_text("")
        res = subprocess.run(["bash", str(ROOT / "scripts" / "results.sh"), "monuseg", str(out)], cwd=ROOT,
                             env={**os.environ, "PIPELINE": str(script), "SEEDS": "0", **env},
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return next(c for c in map(json.loads, log.read_text().splitlines()) if c[0] == "sweep")

    on_cluster = sweep_call(tmp_path / "a", SCHEDULER="local:3")
    assert on_cluster[on_cluster.index("--scheduler") + 1] == "local:3"
    assert "--scheduler" not in sweep_call(tmp_path / "b")


def test_view_text_policies_are_fitted_and_validated_never_tested(stub, tmp_path):
    calls = run(stub, tmp_path / "out", METHODS="textdiff", DROPOUT="", TEXT_MODES="", VIEW_TEXT="rewrite unchanged")
    views = [c for c in calls if "--view-text" in c]
    assert [(Path(c[c.index("--out") + 1]).name, c[c.index("--view-text") + 1]) for c in views] == [
        (f"view{p}-{s}", p) for s in (0, 1) for p in ("rewrite", "unchanged")]
    assert not any(Path(c[1]).name.startswith("view") for c in calls if c[0] == "evaluate")
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| same | 50.00 ± 0.00 | 0,1 |" in table and "| unchanged | 50.00 ± 0.00 | 0,1 |" in table
    assert run(stub, tmp_path / "out", METHODS="textdiff", DROPOUT="", TEXT_MODES="",
               VIEW_TEXT="rewrite unchanged") == [calls[1]]  # resumed: only the extract call again
