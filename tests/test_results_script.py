"""scripts/results.py: evidence in the repository, kept while its settings hold, one store content per table,
and a killed run that finishes the same table. A tiny synthetic protocol with real fits (a few seconds each)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


results = _module("results")
results_table = _module("results_table")

PROTOCOL = {
    "about": "A tiny synthetic protocol.",
    "dataset": "synthetic",
    "unet": {"size": 32, "flags": "cpu-64", "iterations": 0, "samples": 0},
    "extract": {"size": 32, "blocks": [4, 8], "steps": [50], "text_encoder": "minilm", "threads": 1,
                "dataset_options": {"counts": {"train": 4, "val": 2, "test": 2}}},
    "fit": {"epochs": 2, "dim": 8, "head_channels": [4, 4]},
    "baseline": {"epochs": 1, "width": 4, "depth": 2},
    "methods": ["textdiff", "unet"],
    "masks": ["nearest", "authors"],
    "seeds": [0],
    "variants": {"wide": {"method": "textdiff", "settings": {"dim": 12}, "masks": ["authors"], "scored": []}},
}
RUNS = ["textdiff-nearest-0", "textdiff-authors-0", "unet-nearest-0", "unet-authors-0", "wide-authors-0"]


def _protocol(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "protocol.json").write_text(json.dumps({**PROTOCOL, **changes}, indent=2))
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """One protocol run through: (its results folder, its runs root, the runs it made)."""
    base = tmp_path_factory.mktemp("results")
    folder = _protocol(base / "results" / "synthetic" / "tiny")
    heavy = base / "heavy"
    os.environ["HF_HUB_OFFLINE"] = "1"
    return folder, heavy, results.run_protocol(folder, heavy)


def test_every_run_leaves_its_small_files_and_no_heavy_ones(made) -> None:
    folder, heavy, names = made
    assert names == RUNS
    for name in RUNS:
        files = sorted(str(p.relative_to(folder / name)) for p in (folder / name).rglob("*") if p.is_file())
        scored = [] if name.startswith("wide") else ["eval-test/per_image.csv", "eval-test/summary.json"]
        assert files == sorted(["cache_key.json", "config.json", "history.csv", "metrics.json", "store.json",
                                *scored])
        store = json.loads((folder / name / "store.json").read_text())
        assert len(store["content_digest"]) == 64 and store["format_version"] == 3
        config = json.loads((folder / name / "config.json").read_text())
        assert config["fit"]["mask_resize"] == name.split("-")[1]
    assert (heavy / "synthetic" / "tiny" / "textdiff-nearest-0" / "model.safetensors").is_file()
    assert json.loads((folder / "wide-authors-0" / "config.json").read_text())["fit"]["dim"] == 12
    digests = {json.loads((folder / n / "store.json").read_text())["content_digest"] for n in RUNS}
    assert len(digests) == 1  # one store content for the table


def test_current_evidence_is_kept_without_the_store(made, tmp_path: Path) -> None:
    """Committed evidence with the protocol's settings is skipped, even on a machine with no runs root at all."""
    folder, _, _ = made
    copy = tmp_path / "results" / "synthetic" / "tiny"
    shutil.copytree(folder, copy)
    assert results.run_protocol(copy, tmp_path / "empty-heavy") == []
    assert not (tmp_path / "empty-heavy").exists()


def test_a_changed_setting_reruns_only_its_runs(made, tmp_path: Path) -> None:
    folder, heavy, _ = made
    copy = tmp_path / "results" / "synthetic" / "tiny"
    shutil.copytree(folder, copy)
    _protocol(copy, baseline={**PROTOCOL["baseline"], "width": 6})
    assert results.run_protocol(copy, heavy) == ["unet-nearest-0", "unet-authors-0"]
    assert json.loads((copy / "unet-authors-0" / "config.json").read_text())["fit"]["width"] == 6
    assert (copy / "textdiff-nearest-0" / "config.json").read_bytes() == \
        (folder / "textdiff-nearest-0" / "config.json").read_bytes()


def test_evidence_from_another_store_content_is_refitted(made, tmp_path: Path, capsys) -> None:
    """Runs of one table come from one store content: a kept run fitted on other bytes is named and refitted,
    unless its sketch shows the same content up to a CPU's rounding (another machine's rebuild)."""
    folder, heavy, _ = made
    copy = tmp_path / "results" / "synthetic" / "tiny"
    shutil.copytree(folder, copy)

    def edit(name: str, **changes) -> dict:
        path = copy / name / "store.json"
        store = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in {**store, **changes}.items() if v is not None}))
        return store

    store = edit("textdiff-authors-0", content_digest="0" * 64)  # other bits, no sketch: unknown content
    edit("textdiff-authors-0", sketch=None)
    edit("wide-authors-0", content_digest="1" * 64)  # other bits, the same sketch: another CPU's rounding
    sketch = dict(store["sketch"])
    sketch["train/image"] = [x * 1.01 for x in sketch["train/image"]]  # other images
    edit("textdiff-nearest-0", content_digest="2" * 64, sketch=sketch)
    shutil.rmtree(copy / "unet-nearest-0")  # something must be made, so the store is opened
    weights = heavy / "synthetic" / "tiny" / "textdiff-authors-0" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert results.run_protocol(copy, heavy) == ["textdiff-nearest-0", "textdiff-authors-0", "unet-nearest-0"]
    assert weights.stat().st_mtime_ns != before  # fitted again, on the store here
    out = capsys.readouterr().out
    assert "textdiff-authors-0: its store content 000000000000 differs from the store here" in out
    assert "no sketch to compare" in out and "textdiff-nearest-0: its store differs from the store here in " \
        "train/image" in out
    assert "wide-authors-0: the same content up to rounding" in out
    assert json.loads((copy / "textdiff-authors-0" / "store.json").read_text())["content_digest"] == \
        store["content_digest"]


def test_a_killed_results_run_restarted_finishes_the_same_table(made, tmp_path: Path) -> None:
    """Killed in its fit's second epoch (after the first epoch's checkpoint), then run again: its row of the
    table equals the uninterrupted run's."""
    folder, _, _ = made
    copy = _protocol(tmp_path / "results" / "synthetic" / "tiny", methods=["textdiff"], masks=["nearest"],
                     variants={})
    cmd = [sys.executable, str(ROOT / "scripts" / "results.py"), str(copy), "--runs-root", str(tmp_path / "heavy")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TEXTDIFF_TEST_PAUSE_AFTER_EPOCH": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    checkpoint = tmp_path / "heavy" / "synthetic" / "tiny" / "textdiff-nearest-0" / "checkpoint.pt"
    deadline = time.time() + 240
    while not checkpoint.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.is_file() and not (copy / "textdiff-nearest-0").exists()
    env.pop("TEXTDIFF_TEST_PAUSE_AFTER_EPOCH")
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)

    def row(results: Path) -> str:
        return next(line for line in results_table.tables(results).splitlines() if line.startswith("| TextDiff |"))

    assert row(copy.parents[1]) == row(folder.parents[1])


def test_the_table_reads_the_evidence(made) -> None:
    folder, _, _ = made
    text = results_table.tables(folder.parents[1])
    assert text.startswith("### synthetic · tiny\n\nA tiny synthetic protocol. Mean ± std over the training subsets;")
    summary = json.loads((folder / "textdiff-authors-0" / "eval-test" / "summary.json").read_text())
    metrics = json.loads((folder / "textdiff-authors-0" / "metrics.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| TextDiff | authors |"))
    assert row == (f"| TextDiff | authors | {100 * summary['dice']:.2f} ± 0.00 | {100 * summary['iou']:.2f} ± 0.00 | "
                   f"{100 * metrics['best_val_dice']:.2f} ± 0.00 | 0 | — | — | — |")
    assert "| wide | TextDiff | dim 12 | authors |" in text and "| no text (ζ1) |" not in text


def test_a_protocol_without_its_entries_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "protocol.json").write_text(json.dumps({"dataset": "synthetic"}))
    with pytest.raises(SystemExit, match=r"protocol.json: lacks \['unet', 'extract', 'methods', 'masks', 'seeds'\]"):
        results.run_protocol(folder, tmp_path)
    _protocol(folder, variants={"drop-0.5": {"method": "textdiff"}})
    with pytest.raises(SystemExit, match=r"variant names \['drop-0.5'\] must be letters, digits and _ only"):
        results.run_protocol(folder, tmp_path)
    _protocol(folder, fit={"epochs": 2, "dims": 8})
    with pytest.raises(SystemExit, match=r"protocol.json: run textdiff-nearest-0: FitConfig of model 'textdiff' has no "
                                         r"\['dims'\]"):
        results.run_protocol(folder, tmp_path / "heavy")
    assert not (tmp_path / "heavy").exists()


def test_only_takes_names_and_patterns_and_refuses_one_that_matches_nothing(tmp_path: Path) -> None:
    folder = _protocol(tmp_path / "p")
    runs = results.wanted_runs(results.load_protocol(folder))
    picked = results.select_runs(folder, runs, {"unet-*", "wide-authors-0"})
    assert [s.name for s in picked] == ["unet-nearest-0", "unet-authors-0", "wide-authors-0"]
    assert results.select_runs(folder, runs, None) == runs
    with pytest.raises(SystemExit, match=r"p/protocol.json: --only concat-\*, textdif-authors-0 names no run of this "
                                         r"protocol \(its runs: textdiff-nearest-0, "):
        results.run_protocol(folder, tmp_path / "heavy", {"concat-*", "textdif-authors-0", "unet-*"})
    assert not (tmp_path / "heavy").exists()


def test_a_pretrained_protocol_warns_when_its_kept_runs_come_from_another_cpu(tmp_path: Path) -> None:
    pretrained = {"size": 32, "crop": 16, "flags": "cpu-64", "iterations": 50}
    folder = _protocol(tmp_path / "p", unet=pretrained)
    (folder / "textdiff-authors-0").mkdir()
    (folder / "textdiff-authors-0" / "store.json").write_text(json.dumps({"cpu": "AMD EPYC (avx2)"}))
    warning = results.pretrained_elsewhere(folder, results.load_protocol(folder), "Intel Xeon (avx512f)")
    assert "computed on AMD EPYC (avx2) (here: Intel Xeon (avx512f))" in warning and "protocol.json" in warning
    same = results.pretrained_elsewhere(folder, results.load_protocol(folder), "AMD EPYC (avx2)")
    fixed = {**PROTOCOL, "unet": {**pretrained, "iterations": 0}}
    assert same is None and results.pretrained_elsewhere(folder, fixed, "Intel Xeon (avx512f)") is None


def test_the_gpu_protocol_script_runs_on_the_cpu_at_a_tiny_scale(tmp_path: Path) -> None:
    """scripts/gpu_protocol.sh on a tiny CPU protocol: its evidence as every results run's, its timings in the
    marked block of the benchmarks page (made once, replaced on the next run)."""
    proto = _protocol(tmp_path / "results" / "synthetic" / "gpu", methods=["textdiff"], masks=["authors"],
                      variants={}, device="cpu")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_TESTS": "0", "BENCH_DOC": str(doc),
           "RUNS_ROOT": str(tmp_path / "heavy"), "HF_HUB_OFFLINE": "1"}
    for _ in range(2):
        subprocess.run(["bash", str(ROOT / "scripts" / "gpu_protocol.sh"), str(proto)], env=env, check=True,
                       capture_output=True, text=True)
    assert (proto / "textdiff-authors-0" / "eval-test" / "summary.json").is_file()
    text = doc.read_text()
    assert text.count("<!-- gpu_protocol.sh -->") == 1 and text.count("| machine | protocol |") == 1
    row = text.split("|---|---|---|---|---|---|\n")[1].splitlines()[0]
    assert f"| {proto} | 0 |" in row and row.endswith("| not run |")  # the second run made nothing


def test_a_protocols_tta_is_scored_on_validation_where_its_weights_are_at_hand(made, tmp_path: Path) -> None:
    """A protocol that adds test-time augmentation evaluates the runs whose weights the runs root still holds
    (on validation, no refit) and keeps the others' evidence as it is rather than refitting them for it."""
    folder, heavy, _ = made
    copy = _protocol(tmp_path / "results" / "synthetic" / "tiny", tta=["flips"])
    shutil.copytree(folder, copy, dirs_exist_ok=True)
    _protocol(copy, tta=["flips"], scored_tta="flips")  # as if validation chose it: test is scored with it too
    assert results.run_protocol(copy, tmp_path / "empty-heavy") == []  # no weights at hand: kept
    root = heavy / "synthetic" / "tiny"
    at_hand = [n for n in RUNS if results.rundir.weights_sha256(root / n)
               == json.loads((folder / n / "store.json").read_text())["weights_sha256"]]
    stamps = {n: (root / n / "model.safetensors").stat().st_mtime_ns for n in at_hand}
    assert at_hand and results.run_protocol(copy, heavy) == at_hand
    for n in at_hand:
        summary = json.loads((copy / n / "eval-val-tta-flips" / "summary.json").read_text())
        assert summary["tta"] == "flips" and summary["split"] == "val"
        if not n.startswith("wide"):  # the variant scores no split
            assert json.loads((copy / n / "eval-test-tta-flips" / "summary.json").read_text())["split"] == "test"
        assert (root / n / "model.safetensors").stat().st_mtime_ns == stamps[n]  # evaluated, not refitted
    table = results_table.protocol_table(copy)
    assert "| run | masks | none | flips | gain flips | subsets |" in table
    assert table[4].endswith("| earlier Dice % | test Dice % with TTA flips |")
    assert any(line.startswith("| textdiff | ") for line in table)  # a row of the TTA table


def test_a_kept_run_of_other_content_is_refitted_where_the_store_is_at_hand(made, tmp_path: Path) -> None:
    """Nothing stale, but the runs root holds the store and a kept run was fitted on other content: it is found and
    refitted (without the store at hand nothing is opened, as above)."""
    folder, heavy, _ = made
    copy = tmp_path / "results" / "synthetic" / "tiny"
    shutil.copytree(folder, copy)
    path = copy / "unet-authors-0" / "store.json"
    store = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in store.items() if k != "sketch"} | {"content_digest": "3" * 64}))
    assert results.run_protocol(copy, tmp_path / "empty-heavy") == []
    assert results.run_protocol(copy, heavy) == ["unet-authors-0"]
    assert json.loads(path.read_text())["content_digest"] == store["content_digest"]
