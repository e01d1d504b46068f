"""Small helpers shared by the benchmark scripts: data, tables, result files, machine facts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.evaluate.harness import format_table as evaluate_table
from lmforge.tokenizer import Tokenizer, train_char

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SHARED_DATA = BENCH_DIR.parent.parent / "shared" / "data"
DEFAULT_DATA = SHARED_DATA / "tinyshakespeare" / "input.txt"
# Exit status of a script whose input data is absent (automake's "skipped"): the test suite skips it.
DATA_ABSENT = 77
# Where --quick runs write their result files (default: a fresh temporary folder), never benchmarks/results.
QUICK_RESULTS_ENV = "LMFORGE_QUICK_RESULTS"


def require_data(path: str | Path, hint: str) -> Path:
    """`path` if it exists; otherwise say so and exit with DATA_ABSENT."""
    path = Path(path)
    if not path.exists():
        print(f"{path} not found; {hint}", file=sys.stderr)
        raise SystemExit(DATA_ABSENT)
    return path


def load_char_data(path: str | Path) -> tuple[Tokenizer, np.ndarray]:
    """Char-level tokenizer over the whole file (no special tokens) and the file as token ids."""
    path = require_data(path, "pass --data PATH to tiny Shakespeare's input.txt")
    text = path.read_text(encoding="utf-8")
    tokenizer = train_char([text])
    return tokenizer, np.asarray(tokenizer.encode(text), dtype=np.int64)


def split_90_10(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First 90% for training, last 10% for validation, as nanoGPT's shakespeare_char/prepare.py."""
    cut = int(0.9 * len(tokens))
    return tokens[:cut], tokens[cut:]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one (platform.processor() is often empty)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs from /proc/stat (Linux)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def wait_for_idle_cpu(max_wait_s: float = 180.0, idle_fraction: float = 0.9, quiet_s: int = 3) -> bool:
    """Wait until the machine's CPUs were >= idle_fraction idle for quiet_s seconds in a row.

    Other processes on a 2-core machine make PyTorch's OpenMP threads wait on each other, which
    slows small steps many-fold; a timing that starts on a busy machine means little. Returns
    whether the machine went quiet within max_wait_s (the caller decides what to do if not).
    """
    if not Path("/proc/stat").is_file():
        return True
    deadline, quiet = time.monotonic() + max_wait_s, 0
    idle, total = _cpu_times()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        idle2, total2 = _cpu_times()
        busy = 1.0 - (idle2 - idle) / max(1, total2 - total)
        idle, total = idle2, total2
        quiet = quiet + 1 if busy <= 1.0 - idle_fraction else 0
        if quiet >= quiet_s:
            return True
    return False


def settle(enabled: bool, max_wait_s: float = 180.0) -> None:
    """Before a timing: wait for other processes to leave the CPUs idle (see wait_for_idle_cpu)."""
    if enabled and not wait_for_idle_cpu(max_wait_s):
        print(f"  (note: other processes kept the CPUs busy for {max_wait_s:.0f}s; timing anyway)", flush=True)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table; numbers are right-aligned, floats rounded for reading."""
    return evaluate_table(headers, rows, cell=_cell)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


_quick_dir: Path | None = None


def results_dir(quick: bool = False) -> Path:
    """benchmarks/results for a measurement; for a --quick smoke run $LMFORGE_QUICK_RESULTS or a temporary
    folder, so that a smoke run goes through the same writing code without replacing the recorded results."""
    global _quick_dir
    if not quick:
        folder = RESULTS_DIR
    elif os.environ.get(QUICK_RESULTS_ENV):
        folder = Path(os.environ[QUICK_RESULTS_ENV])
    else:
        _quick_dir = _quick_dir or Path(tempfile.mkdtemp(prefix="lmforge-quick-results-"))
        folder = _quick_dir
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_results(name: str, payload: dict[str, Any], quick: bool = False) -> Path:
    """`<results_dir(quick)>/<name>.json`: the payload plus the machine it ran on."""
    path = results_dir(quick) / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine_info(), **payload}, indent=2) + "\n")
    return path
