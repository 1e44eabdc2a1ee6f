"""What every benchmark shares: the machine's description, timing, a random-weight UNet, output.

Run a benchmark as ``python bench/NAME.py [--quick]`` from the repository root. Because a script's
own folder comes first on ``sys.path`` (and ``bench/extract.py`` would shadow the ``extract``
package), each script calls :func:`setup_path` before importing the project.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: ../shared/data beside the checkout, or $TEXTDIFF_SHARED/data (as the tests find it)
SHARED_DATA = Path(os.environ.get("TEXTDIFF_SHARED") or ROOT.parent / "shared") / "data"


def setup_path() -> None:
    """Put the repository root, not ``bench/``, first on ``sys.path``."""
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(here)]
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --data-root (QaTa-COV19), --out, --unet-channels."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: under 3 minutes on 2 CPU cores")
    ap.add_argument("--data-root", type=Path, default=SHARED_DATA / "QaTa-COV19")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for NAME-MODE.json and .md")
    ap.add_argument("--unet-channels", type=int, default=None,
                    help="the random UNet's base width, a multiple of 32 (same blocks; the tests' tiny runs use 32) [the bench's own]")
    return ap


def machine() -> dict[str, Any]:
    """CPU model, cores and threads, memory, GPU (if any), torch version."""
    import torch

    from common.devices import cpu_model

    cpu = cpu_model()
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gb": mem_gb,
            "gpu": gpu, "torch": torch.__version__, "python": platform.python_version()}


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ", no GPU"
    return f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, {m['memory_gb']} GB){gpu}; torch {m['torch']}"


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """(median, all) wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def work_dir() -> Path:
    """A temporary folder for stores, runs and weights, removed when the benchmark exits."""
    path = Path(tempfile.mkdtemp(prefix="textdiff-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def random_unet_dir(flags: dict[str, Any], folder: Path, seed: int = 0, channels: int | None = None) -> Path:
    """A folder ``pipeline extract --unet`` takes (model.pt + flags.json) holding seeded random weights;
    ``channels`` narrows the UNet's base width (the layout, and so the block indices, stay)."""
    import torch

    from extract.unet import create_unet

    if channels:
        if channels % 32:
            raise SystemExit(f"--unet-channels {channels}: the UNet's GroupNorm takes 32 groups; give a multiple of 32")
        flags = {**flags, "num_channels": channels, "num_head_channels": min(flags["num_head_channels"], channels)}
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model.pt").is_file():
        torch.manual_seed(seed)
        model = create_unet(**flags)
        with torch.no_grad():  # guided-diffusion zero-inits residual branches; give them weights, as trained
            for name, p in model.named_parameters():
                if p.dim() > 1 and p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        torch.save(model.state_dict(), folder / "model.pt")
        (folder / "flags.json").write_text(json.dumps(flags, indent=1) + "\n")
    return folder


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, mode: str, out_dir: Path, tables: dict[str, tuple[Sequence[str], Sequence[Sequence[Any]]]],
           result: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Print each table (markdown) and the RESULT line; write ``out_dir/NAME-MODE.json`` and ``.md``."""
    m = machine()
    text = [f"# bench/{name}.py ({mode})", "", f"Machine: {machine_line(m)}", ""]
    for title, (header, rows) in tables.items():
        text += [f"## {title}", "", markdown_table(header, rows), ""]
    result_line = "RESULT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in result.items())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}-{mode}.md").write_text("\n".join([*text, result_line]) + "\n")
    payload = {"benchmark": name, "mode": mode, "machine": m, "command": " ".join([Path(sys.argv[0]).as_posix(),
                                                                                    *sys.argv[1:]]),
               "meta": meta, "tables": {t: {"header": list(h), "rows": [list(r) for r in rows]}
                                        for t, (h, rows) in tables.items()}, "result": result}
    path = out_dir / f"{name}-{mode}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print("\n".join(text))
    print(f"(written {path} and {path.with_suffix('.md')})", file=sys.stderr, flush=True)
    print(result_line, flush=True)
    return path
