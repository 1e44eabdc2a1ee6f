"""The paper's protocol as committed evidence (issue 26): a results grid that fills over many sittings.

    python scripts/results.py results/monuseg/256-untrained [--runs-root DIR] [--only NAME|PATTERN,...] [--commit]

A protocol is a folder under ``results/`` holding ``protocol.json``: the dataset, the UNet (a ``pipeline
pretrain`` recipe or a checkpoint name), the extraction, the fit and baseline settings, the methods × mask
resizings × subset seeds, and variants (one setting changed, e.g. the paper's width on one subset). For each
run it names, the script fits (resumably) and evaluates it in the runs root — heavy files, outside the work
tree: ``--runs-root``, ``$TEXTDIFF_RUNS``, or ``textdiff-runs`` beside the cache folder — then copies its small
files (:data:`EVIDENCE`) into ``<protocol>/<run>/``, with ``store.json`` naming the store's key and content
digest. A run whose evidence was made with the same settings and the same extraction recipe is skipped
without touching the store; a changed setting reruns it. When the store is (re)built, its content digest is
checked against every kept run's: a run fitted on other bytes is named and refitted, so one table comes from
one store content. ``--commit`` commits each run's evidence as it lands (an interruption loses at most the run
in progress; its fit resumes from its checkpoint). ``scripts/results_table.py`` builds the tables from the
evidence alone.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cache.key import canonical_json, default_cache_dir  # noqa: E402
from train.runs import rundir  # noqa: E402

PROTOCOL = "protocol.json"
STORE = "store.json"
#: the files of a finished run kept as evidence (beside every eval-*/summary.json and per_image.csv)
EVIDENCE = (rundir.CONFIG, rundir.METRICS, rundir.HISTORY, rundir.CACHE_KEY)
EVAL_FILES = (rundir.SUMMARY, rundir.PER_IMAGE)
#: each method: the train command and its own settings (beside the protocol's ``fit`` or ``baseline``)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "textdiff": ("fit", {}), "notext": ("fit", {"fusion": "none"}), "concat": ("fit", {"fusion": "concat"}),
    "unet": ("baseline", {"model": "plain-unet"}),
}


@dataclass(frozen=True)
class RunSpec:
    """One run of a protocol: its name, method, fit settings (flat FitConfig keys) and the splits it scores."""

    name: str
    method: str
    settings: dict[str, Any]
    scored: tuple[str, ...] = ("test",)
    text_modes: tuple[str, ...] = field(default=())
    tta: tuple[str, ...] = field(default=())  # test-time augmentations, scored on validation only
    scored_tta: str = "none"  # the test-time augmentation chosen on validation: the scored splits with it too


def runs_root(given: str | None = None) -> Path:
    """Where heavy artefacts go: ``given``, ``$TEXTDIFF_RUNS``, or ``textdiff-runs`` beside the cache folder."""
    if given:
        return Path(given)
    if os.environ.get("TEXTDIFF_RUNS"):
        return Path(os.environ["TEXTDIFF_RUNS"])
    return Path(str(default_cache_dir())).parent / "textdiff-runs"


def load_protocol(folder: Path) -> dict[str, Any]:
    """``folder/protocol.json``, its required entries checked (one line naming the file when not)."""
    path = Path(folder) / PROTOCOL
    if not path.is_file():
        raise SystemExit(f"error: {path}: no protocol file (a results folder holds {PROTOCOL})")
    proto = json.loads(path.read_text())
    missing = [k for k in ("dataset", "unet", "extract", "methods", "masks", "seeds") if k not in proto]
    if missing:
        raise SystemExit(f"error: {path}: lacks {missing}")
    unknown = [m for m in proto["methods"] if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: {path}: unknown methods {unknown} (known: {list(METHODS)})")
    bad = [name for name in proto.get("variants", {}) if not re.fullmatch(r"[A-Za-z0-9_]+", name)]
    if bad:  # a run is <name>-<masks>-<seed>: the table splits it there
        raise SystemExit(f"error: {path}: variant names {bad} must be letters, digits and _ only")
    return proto


def recipe(proto: dict[str, Any]) -> str:
    """What determines the store's content: the dataset, UNet and extraction entries, as canonical JSON."""
    return canonical_json({k: proto.get(k) for k in ("dataset", "unet", "extract")})


def wanted_runs(proto: dict[str, Any]) -> list[RunSpec]:
    """Every run the protocol names: methods × masks × seeds, then each variant's."""
    specs = [_spec(proto, method, masks, seed, method, {}, proto.get("scored", ["test"]))
             for method in proto["methods"] for masks in proto["masks"] for seed in proto["seeds"]]
    for name, var in proto.get("variants", {}).items():
        specs += [_spec(proto, var["method"], masks, seed, name, var.get("settings", {}),
                        var.get("scored", proto.get("scored", ["test"])))
                  for masks in var.get("masks", proto["masks"]) for seed in var.get("seeds", proto["seeds"])]
    return specs


def _spec(proto: dict[str, Any], method: str, masks: str, seed: int, name: str, own: dict[str, Any],
          scored: list[str]) -> RunSpec:
    command, fixed = METHODS[method]
    settings = {**proto.get("baseline" if command == "baseline" else "fit", {}), **fixed, **own,
                "mask_resize": masks, "subset_seed": seed}
    modes = tuple(proto.get("text_modes", [])) if command == "fit" and settings.get("fusion") != "none" else ()
    return RunSpec(f"{name}-{masks}-{seed}", method, settings, tuple(scored), modes, tuple(proto.get("tta", [])),
                   proto.get("scored_tta", "none"))


def evaluations(spec: RunSpec) -> list[tuple[str, str, str]]:
    """The (split, text mode, test-time augmentation) evaluations a run's evidence holds: its scored splits with
    each text mode, validation with each of the protocol's ``tta`` (chosen there, never on test), and the scored
    splits with ``scored_tta``, the one validation chose."""
    return ([(split, "as-is", "none") for split in spec.scored]
            + [(split, mode, "none") for split in spec.scored for mode in spec.text_modes]
            + [("val", "as-is", tta) for tta in spec.tta]
            + [(split, "as-is", spec.scored_tta) for split in spec.scored if spec.scored_tta != "none"])


def _fit_config(spec: RunSpec, store: Path | str, out: Path, **how: Any) -> Any:
    from train.config import FitConfig

    return FitConfig.flat(cache=store, out=out, **spec.settings, **how)


def stale_reason(evidence: Path, spec: RunSpec, proto: dict[str, Any], heavy_run: Path | None = None) -> str | None:
    """Why the committed evidence of ``spec`` must be made again (None: it is current): missing, made by
    another extraction recipe, with other settings, or lacking an evaluation — a test-time-augmentation one only
    where ``heavy_run`` still holds the evidence's weights (evaluating it is then cheap; a refit for it is not)."""
    if not (evidence / STORE).is_file() or not (evidence / rundir.CONFIG).is_file():
        return "no evidence yet"
    store = json.loads((evidence / STORE).read_text())
    if store.get("recipe") != recipe(proto):
        return "the extraction recipe changed"
    recorded = json.loads((evidence / rundir.CONFIG).read_text())["fit"]
    differences = _fit_config(spec, recorded["cache"], evidence).differences(recorded)
    if differences:
        return "settings changed: " + "; ".join(differences)
    for split, mode, tta in evaluations(spec):
        summary = rundir.eval_dir(evidence, split, mode, tta) / rundir.SUMMARY
        if not summary.is_file():
            if tta != "none" and not (heavy_run is not None and rundir.fit_finished(heavy_run)
                                      and rundir.weights_sha256(heavy_run) == store.get("weights_sha256")):
                continue
            return f"no evaluation {summary.parent.name}"
        if json.loads(summary.read_text()).get("weights_sha256") != store.get("weights_sha256"):
            return f"{summary.parent.name} scored other weights"
    return None


def pretrain_iterations(unet: dict[str, Any]) -> int:
    """How many iterations the protocol's ``unet`` entry pretrains (0: a named checkpoint, or initial weights)."""
    from extract.config import PretrainConfig

    return 0 if "name" in unet else unet.get("iterations", PretrainConfig.iterations)


def ensure_unet(proto: dict[str, Any], heavy: Path, data_root: Path | None, folder: Path) -> str:
    """The protocol's UNet: a checkpoint name as it is, or a ``pipeline pretrain`` recipe run (resumably) into
    ``heavy/unet``, first warning (:func:`pretrained_elsewhere`) where the results ``folder``'s kept runs were
    computed on another kind of CPU."""
    unet = proto["unet"]
    if "name" in unet:
        return unet["name"]
    from common.devices import cpu_identity
    from extract.config import PretrainConfig
    from extract.pretrain import pretrain

    out = heavy / "unet"
    if not (out / "model.pt").is_file() or _log_iterations(out) < pretrain_iterations(unet):
        warning = pretrained_elsewhere(folder, proto, cpu_identity())
        if warning:
            print(f"warning: {warning}", flush=True)
        pretrain(PretrainConfig(dataset=proto["dataset"], data_root=data_root, out=out,
                                resume=(out / "state.pt").is_file(), **unet))
    return str(out)


def _log_iterations(out: Path) -> int:
    """The last iteration a pretraining run logged (0: none)."""
    log = out / "train_log.csv"
    lines = log.read_text().splitlines()[1:] if log.is_file() else []
    return int(lines[-1].split(",")[0]) if lines else 0


def ensure_store(proto: dict[str, Any], heavy: Path, data_root: Path | None, unet: str) -> Path:
    """The protocol's store in ``heavy/cache``, extracted (or completed) as its recipe says."""
    from extract.config import ExtractConfig
    from extract.run import run_extract

    cfg = ExtractConfig(dataset=proto["dataset"], data_root=data_root, unet=unet, cache_dir=heavy / "cache",
                        device=proto.get("device"), **{k: tuple(v) if isinstance(v, list) else v
                                                       for k, v in proto["extract"].items()})
    return Path(str(run_extract(cfg)))


def store_facts(store_path: Path, proto: dict[str, Any]) -> dict[str, Any]:
    """What a run's ``store.json`` records: the recipe, the store's key hash, content digest and numeric sketch
    (:func:`cache.integrity.content_sketch`), and the CPU it was computed on."""
    from cache.integrity import content_digest, content_sketch
    from cache.store import FeatureStore
    from common.devices import cpu_identity

    store = FeatureStore.open(store_path)
    return {"recipe": recipe(proto), "key_hash": store.key_hash, "content_digest": content_digest(store),
            "format_version": store.version, "sketch": content_sketch(store), "cpu": cpu_identity()}


def other_content(kept: dict[str, Any], facts: dict[str, Any]) -> str | None:
    """Why a kept run's store (its ``store.json``) is not the content ``facts`` records (None: it is): the digests
    differ and either side has no sketch to compare or the sketches differ beyond a CPU's rounding."""
    from cache.integrity import sketches_agree

    if kept.get("content_digest") == facts.get("content_digest"):
        return None
    if "sketch" not in kept or "sketch" not in facts:
        return (f"its store content {str(kept.get('content_digest'))[:12]} differs from the store here "
                f"{str(facts.get('content_digest'))[:12]} and its evidence has no sketch to compare")
    differ = sketches_agree(kept["sketch"], facts["sketch"])
    if differ:
        return f"its store differs from the store here in {', '.join(differ[:4])}"
    return None


def run_one(spec: RunSpec, store: Path, heavy: Path, proto: dict[str, Any], refit: bool = False) -> Path:
    """Fit ``spec`` into ``heavy/<name>`` (resuming a killed fit; refitting one with other settings, or every
    one with ``refit``) and make each of its evaluations; returns the run folder."""
    from train.evaluate import evaluate
    from train.fit import fit

    out = heavy / spec.name
    changed = rundir.fit_finished(out) and (refit or _fit_config(spec, store, out).differences(
        json.loads((out / rundir.CONFIG).read_text())["fit"]))
    if changed or not rundir.fit_finished(out):
        how = {"overwrite": True} if changed else {"resume": True}
        fit(_fit_config(spec, store, out, device=proto.get("device"), **how))
    for split, mode, tta in evaluations(spec):
        if not rundir.evaluated(out, split, mode, tta):
            evaluate(out, split=split, text=mode, tta=tta, overlays=False, device=proto.get("device"))
    return out


def copy_evidence(run: Path, dest: Path, spec: RunSpec, facts: dict[str, Any]) -> None:
    """The run's small files into ``dest`` (replaced whole: written beside it, then renamed)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in EVIDENCE:
        shutil.copy2(run / name, tmp / name)
    for split, mode, tta in evaluations(spec):
        src = rundir.eval_dir(run, split, mode, tta)
        (tmp / src.name).mkdir()
        for name in EVAL_FILES:
            shutil.copy2(src / name, tmp / src.name / name)
    facts = {**facts, "weights_sha256": rundir.weights_sha256(run)}
    (tmp / STORE).write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def commit(dest: Path, spec: RunSpec) -> None:
    """Commit one run's evidence (only its folder)."""
    summary = rundir.eval_dir(dest, spec.scored[0]) / rundir.SUMMARY if spec.scored else None
    score = f" (test Dice {100 * json.loads(summary.read_text())['dice']:.2f})" if summary else ""
    rel = dest.resolve().relative_to(REPO)
    subprocess.run(["git", "-C", str(REPO), "add", "--all", "--", str(rel)], check=True)
    subprocess.run(["git", "-C", str(REPO), "commit", "-q", "-m", f"results: {rel}{score}", "--", str(rel)],
                   check=True)


def _kept_store_here(folder: Path, proto: dict[str, Any], heavy: Path) -> bool:
    """Whether the runs root already holds a store of the key a kept run's evidence names (then its content is
    checked against theirs: opening it costs seconds, not an extraction)."""
    hashes = {json.loads(p.read_text()).get("key_hash", "") for p in folder.glob(f"*/{STORE}")}
    return any((heavy / "cache" / f"{proto['dataset']}-{h[:12]}.zarr").exists() for h in hashes if h)


def pretrained_elsewhere(folder: Path, proto: dict[str, Any], cpu: str) -> str | None:
    """A warning when the protocol pretrains its UNet and kept runs were computed on another kind of CPU than
    ``cpu``: a pretrained UNet is rebuilt there as another function, so their store content will not be rebuilt
    here and the runs asked for start another content (None: no such runs)."""
    if not pretrain_iterations(proto["unet"]):
        return None
    others = sorted({str(json.loads(p.read_text()).get("cpu", "another CPU")) for p in folder.glob(f"*/{STORE}")}
                    - {cpu})
    if not others:
        return None
    return (f"{folder / PROTOCOL}: its UNet is pretrained here, and kept runs were computed on {', '.join(others)} "
            f"(here: {cpu}); pretraining on another kind of CPU compounds its rounding into other weights, so "
            f"expect another store content: the runs asked for are refitted on it and the tables keep the content "
            f"with the most runs (docs/results.md, 'How results are made')")


def select_runs(folder: Path, runs: list[RunSpec], only: set[str] | None) -> list[RunSpec]:
    """The runs ``only`` names (each a run name or a shell pattern such as ``concat-*`` or ``*-nearest-*``; None:
    all); a name or pattern that matches no run of the protocol is an error, before any work."""
    if only is None:
        return runs
    names = [s.name for s in runs]
    unmatched = sorted(p for p in only if not any(fnmatch.fnmatchcase(n, p) for n in names))
    if unmatched:
        raise SystemExit(f"error: {folder / PROTOCOL}: --only {', '.join(unmatched)} names no run of this protocol "
                         f"(its runs: {', '.join(names)})")
    return [s for s in runs if any(fnmatch.fnmatchcase(s.name, p) for p in only)]


def run_protocol(folder: Path, heavy_root: Path | None = None, only: set[str] | None = None,
                 do_commit: bool = False, data_root: Path | None = None) -> list[str]:
    """Bring every run of the protocol in ``folder`` up to date; returns the names of the runs (re)made."""
    folder = Path(folder)
    proto = load_protocol(folder)
    specs = select_runs(folder, wanted_runs(proto), only)
    for s in specs:  # a setting no fit takes, or a value out of range: one line naming the file, before any work
        try:
            _fit_config(s, "store", folder / s.name)
        except ValueError as e:
            raise SystemExit(f"error: {folder / PROTOCOL}: run {s.name}: {e}") from None
    heavy = (heavy_root or runs_root()) / folder.parent.name / folder.name
    stale = {s.name: stale_reason(folder / s.name, s, proto, heavy / s.name) for s in specs}
    todo = [s for s in specs if stale[s.name]]
    for s in specs:
        print(f"{s.name}: {stale[s.name] or 'evidence current, kept'}", flush=True)
    if not todo and not _kept_store_here(folder, proto, heavy):
        return []  # nothing to make and no store here to check the kept runs against: nothing is opened
    data = data_root or ((REPO / proto["data_root"]).resolve() if proto.get("data_root") else None)
    store = ensure_store(proto, heavy, data, ensure_unet(proto, heavy, data, folder))
    facts = store_facts(store, proto)
    refit = set()
    for s in wanted_runs(proto):  # runs of one table come from one store content (up to a CPU's rounding)
        if s.name in stale and stale[s.name] or not (folder / s.name / STORE).is_file():
            continue
        kept = json.loads((folder / s.name / STORE).read_text())
        why = other_content(kept, facts)
        if why is None and kept.get("content_digest") != facts["content_digest"]:
            print(f"{s.name}: the same content up to rounding (computed on {kept.get('cpu', 'another CPU')}, "
                  f"here on {facts['cpu']}); kept", flush=True)
        elif why is not None and s in specs:
            print(f"{s.name}: {why} ({store}); refitting it", flush=True)
            todo.append(s)
            refit.add(s.name)
        elif why is not None:
            print(f"{s.name}: {why}; not refitted here (not asked for: --only)", flush=True)
    if not todo:
        return []
    made = []
    for s in [s for s in specs if s in todo]:
        run = run_one(s, store, heavy, proto, refit=s.name in refit)
        copy_evidence(run, folder / s.name, s, facts)
        if do_commit:
            commit(folder / s.name, s)
        made.append(s.name)
        print(f"{s.name}: evidence written to {folder / s.name}", flush=True)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", type=Path, help="A results folder holding protocol.json.")
    parser.add_argument("--runs-root", help="Where heavy artefacts go (default: $TEXTDIFF_RUNS, or textdiff-runs "
                                            "beside the cache folder).")
    parser.add_argument("--data-root", type=Path, help="The dataset's folder (default: the protocol's data_root, "
                                                       "relative to the repository).")
    parser.add_argument("--only", help="Comma-separated run names or shell patterns (e.g. 'concat-*,*-nearest-0'): "
                                       "only these.")
    parser.add_argument("--commit", action="store_true", help="git commit each run's evidence as it lands.")
    args = parser.parse_args(argv)
    run_protocol(args.protocol, Path(args.runs_root) if args.runs_root else None,
                 set(args.only.split(",")) if args.only else None, args.commit, args.data_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
