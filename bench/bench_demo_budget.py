"""The demo's budget: both stages of a preset trained from scratch, then `evaluate`, each as the
user runs it (`python -m job ...` on a local run folder), against the budgets the README states.

    python bench/bench_demo_budget.py [--preset small] [--train-budget 720] [--evaluate-budget 90]
                                      [--evaluate-gb 1.5] [--run-dir DIR] [--evaluate-only]

One JSON line per command: wall seconds, each stage's training seconds (the sum of its epochs'
``seconds`` in metrics.jsonl), the command's peak RSS (ru_maxrss of exactly that child, from
os.wait4), and the ratio of each to its budget (<= 1 is within it). Run it on a quiet machine:
the budgets are for 2 quiet cores, and the line records the CPU and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, job_env, note

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of `python -m job ARGS`."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "job", *args], cwd=ROOT, env=job_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"python -m job {' '.join(args)} failed: {stderr[-2000:]}")
    return time.monotonic() - started, usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def epoch_seconds(path: Path) -> float:
    return sum(json.loads(line)["seconds"] for line in path.read_text().splitlines() if line.strip())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--train-budget", type=float, default=720.0, help="seconds for both stages (12 min)")
    parser.add_argument("--evaluate-budget", type=float, default=90.0)
    parser.add_argument("--evaluate-gb", type=float, default=1.5)
    parser.add_argument("--run-dir", help="train into this new folder and keep it (default: a temporary one)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="only evaluate the run already trained in --run-dir (a change to evaluate alone)")
    options = parser.parse_args()
    if options.evaluate_only and not options.run_dir:
        parser.error("--evaluate-only needs --run-dir")
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(options.run_dir) if options.run_dir else Path(work) / "run"
        common = ["--preset", options.preset, "--run-uri", str(run_dir)]
        if not options.evaluate_only:
            train(options, run_dir, common)
        note("evaluate")
        eval_wall, eval_gb = run(["evaluate", *common])
        emit({"bench": "demo_budget", "command": "evaluate", "preset": options.preset,
              "wall_seconds": round(eval_wall, 1), "budget_seconds": options.evaluate_budget,
              "ratio_to_budget": round(eval_wall / options.evaluate_budget, 3), "peak_rss_gb": round(eval_gb, 2),
              "budget_gb": options.evaluate_gb, "memory_ratio_to_budget": round(eval_gb / options.evaluate_gb, 3)})


def train(options: argparse.Namespace, run_dir: Path, common: list[str]) -> None:
    """Trains both stages into ``run_dir`` and emits the train line."""
    note(f"train --preset {options.preset}")
    train_wall, train_gb = run(["train", *common])
    stage1, stage2 = epoch_seconds(run_dir / "metrics.jsonl"), epoch_seconds(run_dir / "stage2" / "metrics.jsonl")
    emit({"bench": "demo_budget", "command": "train", "preset": options.preset, "wall_seconds": round(train_wall, 1),
          "stage1_train_seconds": round(stage1, 1), "stage2_train_seconds": round(stage2, 1),
          "budget_seconds": options.train_budget, "ratio_to_budget": round(train_wall / options.train_budget, 3),
          "peak_rss_gb": round(train_gb, 2)})


if __name__ == "__main__":
    main()
