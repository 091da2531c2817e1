"""Host syncs per training step of a real `fit` on a GPU, counted by torch itself: with
`torch.cuda.set_sync_debug_mode("warn")` every operation that makes the host wait for the device warns, and a
callback counts those warnings over each whole loop iteration (from one batch's start to the next one's).

    python scripts/count_gpu_syncs.py --config configs/stackexchange.yaml --model .bench/model \
        --train .bench/pairs.tsv --val .bench/dev.tsv --steps 40 --json syncs.json

It prints a table (steady-state steps apart from logging steps, and logging steps) and writes every step's count
to the JSON. The CPU test tests/training/test_host_sync.py asserts the same on a CPU; this is its GPU
measurement, not a test. On a machine without CUDA it runs the fit and counts nothing (the dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

SYNC_WARNING = "synchronizing CUDA operation"
RESULT_ENV = "MINILM_STS_SYNC_COUNT_JSON"  # where the callback, built by the CLI in this process, writes


class SyncCounter(L.Callback):
    """Counts torch's sync warnings in each training-loop iteration, and whether it was a logging step."""

    def __init__(self):
        self.count, self.started_at, self.steps = 0, None, []

    def _seen(self, message, category, filename, lineno, file=None, line=None) -> None:
        if SYNC_WARNING in str(message):
            self.count += 1
        else:
            self._show(message, category, filename, lineno, file, line)

    def on_train_start(self, trainer, pl_module) -> None:
        self._show, warnings.showwarning = warnings.showwarning, self._seen
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")  # not once per place: every time
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.started_at is not None:
            self.steps[-1]["syncs"] = self.count - self.started_at
        self.started_at = self.count

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from minilm_sts._compat import is_logging_step

        self.steps.append({"step": trainer.global_step, "logging": is_logging_step(trainer), "syncs": None})

    def on_train_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show
        Path(os.environ[RESULT_ENV]).write_text(json.dumps(self.steps))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/stackexchange.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--precision", default=None, help="as --trainer.precision (default: the recipe's)")
    parser.add_argument("--root", default="sync-count-run", help="the run's folder")
    parser.add_argument("--json", type=Path, default=Path("sync_count.json"))
    return parser.parse_args()


def summary(steps: list[dict]) -> dict:
    """Counts after the first iteration (which sets things up), apart for logging and other steps."""
    counted = [s for s in steps[1:] if s["syncs"] is not None]
    kinds = {"other steps": [s["syncs"] for s in counted if not s["logging"]],
             "logging steps": [s["syncs"] for s in counted if s["logging"]]}
    return {kind: {"steps": len(c), "max": max(c, default=0), "median": statistics.median(c) if c else 0}
            for kind, c in kinds.items()}


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # so that the CLI can import this file's callback
    os.environ[RESULT_ENV] = str(args.json.resolve())
    from minilm_sts.cli.commands import main as cli

    cli(["fit", "--config", args.config, "--model.pretrained", args.model, "--data.train_path", args.train,
         "--data.val_path", args.val, "--data.test_path", "null", "--trainer.max_steps", str(args.steps),
         "--trainer.val_check_interval", str(args.steps), "--trainer.log_every_n_steps", "10",
         "--trainer.logger", "false", "--trainer.default_root_dir", args.root,
         "--trainer.callbacks+=count_gpu_syncs.SyncCounter",
         *(["--trainer.precision", args.precision] if args.precision else [])])
    steps = json.loads(args.json.read_text())
    result = {"cuda": torch.cuda.is_available(), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              else "cpu (dry run: nothing counted)", "summary": summary(steps), "steps": steps}
    args.json.write_text(json.dumps(result, indent=2))
    print(f"Host syncs per training-loop iteration, {result['device']}, {args.steps} steps, logging every 10:")
    print("| steps | count | max | median |\n|---|---|---|---|")
    for kind, s in result["summary"].items():
        print(f"| {kind} | {s['steps']} | {s['max']} | {s['median']} |")


if __name__ == "__main__":
    main()
