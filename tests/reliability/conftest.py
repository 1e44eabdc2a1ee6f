"""Fixtures of the fault suite: small copies of the real MoNuSeg (and QaTa) data, a good store made from
them, and ways to run the CLI (in this process, or as a child process that can be killed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import openpyxl
import pytest
from typer.testing import CliRunner

import pipeline

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("TEXTDIFF_SHARED", REPO.parent / "shared"))
MONUSEG = SHARED / "data" / "MoNuSeg"
QATA = SHARED / "data" / "QaTa-COV19"
LVIT_FOLDERS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
MINI = {"train": 3, "val": 1, "test": 1}


@pytest.fixture(scope="session", autouse=True)
def real_data_and_unet(monuseg_root: Path, tiny_unet: Path):
    """Every test here works on a small copy of the real MoNuSeg data (so needs ../shared), with the tiny UNet
    the suite builds. Session scope: set before any module fixture runs the CLI. Its folder travels in the
    environment, as this file is imported twice (by pytest, and by the tests as tests.reliability.conftest)."""
    os.environ["TEXTDIFF_TEST_UNET"] = str(tiny_unet)
    yield
    os.environ.pop("TEXTDIFF_TEST_UNET", None)


def unet_dir() -> Path:
    """The folder holding this session's ``adm_tiny.pt`` and ``adm_tiny_flags.json``."""
    return Path(os.environ["TEXTDIFF_TEST_UNET"])


def extract_args(root: Path, cache: Path, *extra: str, dataset: str = "monuseg") -> list[str]:
    """``pipeline extract`` of a mini dataset with the tiny UNet and MiniLM at 32 px (seconds)."""
    return ["extract", "--dataset", dataset, "--data-root", str(root), "--unet", str(unet_dir() / "adm_tiny.pt"),
            "--unet-flags", str(unet_dir() / "adm_tiny_flags.json"), "--text-encoder", "minilm", "--size", "32",
            "--steps", "50,250", "--blocks", "4,8", "--batch-size", "2", "--cache-dir", str(cache), *extra]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The one error line; fails unless there is exactly one, it is the last line, and no traceback."""
        lines = self.stderr.strip().splitlines()
        errors = [ln for ln in lines if ln.startswith("error:")]
        assert "Traceback" not in self.stderr, self.stderr
        assert len(errors) == 1 and lines[-1] == errors[0], self.stderr
        return errors[0]


def cli(args: Sequence[str]) -> Result:
    """Run the CLI in this process (fast: models and imports stay loaded)."""
    res = CliRunner().invoke(pipeline.app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Result(res.exit_code, res.stdout, res.stderr)


def child(args: Sequence[str], **kw) -> subprocess.Popen:
    """The CLI as a child process (to be killed or interrupted), one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "pipeline.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 300) -> Result:
    out, err = proc.communicate(timeout=timeout)
    return Result(proc.returncode, out, err)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (metadata included), by relative path; of the file itself
    for a file (an HDF5 store)."""
    if folder.is_file():
        return {folder.name: hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stores(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.suffix in (".zarr", ".h5"))


def done_rows(store: Path) -> int:
    """Done flags set in a zarr store (one chunk file each), counted without opening it."""
    return sum(1 for p in store.glob("*/done/**/c/*") if p.is_file())


def wait_for(predicate, timeout: float = 120, every: float = 0.005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


# --------------------------------------------------------------------------- mini datasets

def mini_monuseg(dest: Path, counts: dict[str, int] | None = None) -> Path:
    """The first images of each MoNuSeg split with their masks and LViT's text table rows."""
    if not MONUSEG.is_dir():
        pytest.skip(f"{MONUSEG} is absent")
    for split, folder in LVIT_FOLDERS.items():
        src, out = MONUSEG / folder, dest / folder
        (out / "img").mkdir(parents=True)
        (out / "labelcol").mkdir()
        table = f"{folder.split('_')[0]}_text.xlsx"
        rows = list(openpyxl.load_workbook(src / table, read_only=True).worksheets[0].iter_rows(values_only=True))
        keep = rows[1:1 + (counts or MINI)[split]]
        for name, _text in keep:
            stem = Path(name).stem
            shutil.copy(src / "labelcol" / name, out / "labelcol" / name)
            image = next(p for p in (src / "img").iterdir() if p.stem == stem)
            shutil.copy(image, out / "img" / image.name)
        write_xlsx(out / table, [rows[0], *keep])
    return dest


def write_xlsx(path: Path, rows: Sequence[Sequence[object]]) -> None:
    wb = openpyxl.Workbook()
    for row in rows:
        wb.active.append(list(row))
    wb.save(path)


def read_xlsx(path: Path) -> list[list[object]]:
    return [list(r) for r in openpyxl.load_workbook(path).worksheets[0].iter_rows(values_only=True)]


def mini_qata(dest: Path, per_split: int = 2) -> Path:
    """QaTa-COV19 in SGSeg's layout (prompts/annotation.json) with the first images of each split."""
    if not QATA.is_dir():
        pytest.skip(f"{QATA} is absent")
    ann = json.loads((QATA / "prompts" / "annotation.json").read_text())
    out_ann = {}
    for split in ("train", "valid", "test"):
        src, out = QATA / "images" / split, dest / "images" / split
        (out / "images").mkdir(parents=True)
        (out / "masks").mkdir()
        entries = []
        for e in ann[split]:
            mask = src / "masks" / e["image_path"]
            image = src / "images" / e["image_path"].removeprefix("mask_")
            if mask.is_file() and image.is_file():
                shutil.copy(mask, out / "masks" / mask.name)
                shutil.copy(image, out / "images" / image.name)
                entries.append(e)
            if len(entries) == per_split:
                break
        out_ann[split] = entries
    (dest / "prompts").mkdir()
    (dest / "prompts" / "annotation.json").write_text(json.dumps(out_ann, indent=1))
    return dest


def mini_folder(dest: Path) -> Path:
    """The generic ``folder`` layout (images/, masks/, texts.csv with a split column) from mini MoNuSeg."""
    lvit = mini_monuseg(dest / "_lvit")
    (dest / "images").mkdir()
    (dest / "masks").mkdir()
    lines = ["image,text,split"]
    for split, folder in LVIT_FOLDERS.items():
        for name, text in read_xlsx(lvit / folder / f"{folder.split('_')[0]}_text.xlsx")[1:]:
            stem = Path(str(name)).stem
            image = next(p for p in (lvit / folder / "img").iterdir() if p.stem == stem)
            shutil.copy(image, dest / "images" / image.name)
            shutil.copy(lvit / folder / "labelcol" / str(name), dest / "masks" / f"{stem}.png")
            lines.append(f'{image.name},"{text}",{split}')
    (dest / "texts.csv").write_text("\n".join(lines) + "\n")
    shutil.rmtree(lvit)
    return dest


@pytest.fixture(scope="session")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(mini MoNuSeg folder, cache folder holding its complete store)."""
    base = tmp_path_factory.mktemp("good")
    root, cache = mini_monuseg(base / "monuseg"), base / "cache"
    res = cli(extract_args(root, cache))
    assert res.code == 0, res.stderr
    return root, cache


@pytest.fixture
def case(good: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the good dataset and of the cache holding its store (to break one thing in)."""
    root, cache = tmp_path / "monuseg", tmp_path / "cache"
    shutil.copytree(good[0], root)
    shutil.copytree(good[1], cache)
    return root, cache
