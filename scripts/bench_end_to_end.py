"""End to end, as users compare: `python -m minilm_sts fit` against sentence-transformers' own
`SentenceTransformerTrainer` (`scripts/st_trainer_fit.py`), each timed as a whole process on the same pairs,
step count, threads, batch size, max length, precision and schedule, each validating once at its end.

Each side runs at two step counts; the time per step is the difference of the two runs' wall times divided by
the difference of the step counts, so start-up (imports, model load, tokenization, compilation, validation)
cancels. After one untimed warm-up run per side (round 0: it fills the token cache and the compiler's cache),
rounds alternate the sides (A B A B) and each side reports its best round and the median. A side whose
process fails is reported and left out; the others go on.

    python scripts/bench_end_to_end.py                      # STS-B train, fp32, 2 rounds
    python scripts/bench_end_to_end.py --tiny --steps 50 550 --rounds 3    # the launch-bound proxy (issue 21)
    python scripts/bench_end_to_end.py --train ../quora/train.tsv --val ../quora/dev.tsv \
--config configs/stackexchange.yaml

Our side exits non-zero on a non-finite loss, so a finished run means every loss was finite; its validation
Spearman is read from the best checkpoint's name. It is a measurement, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minilm_sts.hardware import describe_machine, machine

from benchmark import versions  # the in-process benchmark's, beside this script

ROOT = Path(__file__).resolve().parents[1]
SEED_PAIRS = 489_640  # the seed model's epoch
# `minilm_sts` and `minilm_sts-before` run `fit` as users do, with no flag: the path it picks for the device.
COMPILE_FLAGS = {"minilm_sts-compiled": ["--model.compile", "true"], "minilm_sts-eager": ["--model.compile", "false"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default="builtin:stsb/train", help="a pair file, or builtin:stsb/train")
    parser.add_argument("--val", default="builtin:stsb/dev")
    parser.add_argument("--label-scale", type=float, default=1.0)
    parser.add_argument("--config", default="configs/stsb.yaml", help="the minilm_sts recipe both sides follow")
    parser.add_argument("--model", default=None, help="a model folder for both sides (default: all-MiniLM-L6-v2)")
    parser.add_argument("--precision", default="32", choices=["32", "16-mixed", "bf16-mixed"])
    parser.add_argument("--steps", type=int, nargs=2, default=[15, 75], metavar=("FEW", "MANY"))
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step, on both sides")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--sides", default="minilm_sts,sentence-transformers",
                        help="comma-separated: minilm_sts (fit as users run it), minilm_sts-compiled, "
                             "minilm_sts-eager, minilm_sts-before, sentence-transformers")
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout (an earlier commit), whose minilm_sts the minilm_sts-before side runs")
    parser.add_argument("--tiny", action="store_true",
                        help="the launch-bound proxy: both sides train a 2-layer, 64-wide BERT (random weights, the "
                             "model's tokenizer), a tenth of the real model's compute per token, so that framework, "
                             "data and launches weigh far more")
    parser.add_argument("--budget", type=float, default=None, help="seconds: start no round after this")
    parser.add_argument("--json", type=Path, default=Path("bench_end_to_end.json"))
    return parser.parse_args()


def packaged_file(source: str, folder: Path) -> Path:
    """A builtin:stsb/SPLIT source as a plain file, for the reference script, which reads files only."""
    if not source.startswith("builtin:"):
        return Path(source)
    from importlib import resources

    packaged = resources.files("minilm_sts") / "data" / f"{source.removeprefix('builtin:')}.tsv.gz"
    target = folder / f"{source.removeprefix('builtin:').replace('/', '-')}.tsv.gz"
    target.write_bytes(packaged.read_bytes())
    return target


def tiny_model(source: str, folder: Path) -> Path:
    """A 2-layer BERT of hidden size 64 with `source`'s tokenizer, saved by transformers as a plain model folder
    (both sides pool it by the mean)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def command(side: str, steps: int, args, scratch: Path) -> list[str]:
    if side == "sentence-transformers":
        return [sys.executable, str(ROOT / "scripts/st_trainer_fit.py"), "--model", args.model, "--steps", str(steps),
                "--train", str(packaged_file(args.train, scratch)), "--val", str(packaged_file(args.val, scratch)),
                "--label-scale", str(args.label_scale), "--precision", args.precision,
                "--batch-size", str(args.batch_size)]
    logging = [] if importlib.util.find_spec("wandb") else ["--trainer.logger", "false"]
    return [sys.executable, "-m", "minilm_sts", "fit", "--config", args.config, "--model.pretrained", args.model,
            "--data.train_path", args.train, "--data.val_path", args.val, "--data.test_path", "null",
            "--data.label_scale", str(args.label_scale), "--data.batch_size", str(args.batch_size),
            "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.default_root_dir", str(scratch / "runs"),
            "--trainer.precision", "32-true" if args.precision == "32" else args.precision,
            *COMPILE_FLAGS.get(side, []), *logging]


def child_env(threads: int, scratch: Path, root: Path = ROOT) -> dict[str, str]:
    """The environment of each timed process: this working tree (or `root`) first on the import path, and
    whatever was there before after it (the GPU machine's carried wheels live there)."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path, "WANDB_MODE": "offline",
            "WANDB_DIR": str(scratch), "MINILM_STS_CACHE": str(scratch / "cache"), "HF_HUB_OFFLINE": "1"}


def spearman_in_name(checkpoint: Path) -> float:
    """The score in a checkpoint's name, also where Lightning added `-v1` for a name already taken."""
    return float(re.search(r"spearman(\d+\.\d+)", checkpoint.name).group(1))


def run(side: str, steps: int, args, scratch: Path) -> tuple[float, dict]:
    """Wall seconds of one whole process, and what it reported about the model it trained."""
    runs = scratch / "runs"
    before = set(runs.rglob("*spearman*.ckpt")) if runs.exists() else set()
    env = child_env(args.threads, scratch, args.before.resolve() if side == "minilm_sts-before" else ROOT)
    started = time.perf_counter()
    # In the scratch folder, so that the runs' W&B folders and checkpoints land there too.
    done = subprocess.run(command(side, steps, args, scratch), cwd=scratch, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{side}, {steps} steps, exit {done.returncode}:\n{done.stderr[-3000:]}")
    if side == "sentence-transformers":
        return seconds, json.loads(done.stdout.split("RESULT", 1)[1])
    best = sorted(set(runs.rglob("*spearman*.ckpt")) - before)
    return seconds, {"val_spearman": spearman_in_name(best[-1]) if best else None}


def measure(args, scratch: Path) -> dict:
    few, many = args.steps
    results = {side: {"seconds": {few: [], many: []}, "reports": []} for side in args.sides.split(",")}
    started = time.perf_counter()
    for round_index in range(args.rounds + 1):  # round 0 is the untimed warm-up
        if args.budget and round_index > 1 and time.perf_counter() - started > args.budget:
            print(f"budget of {args.budget:.0f} s spent: stopping after {round_index - 1} round(s)", flush=True)
            break
        for steps in (few,) if round_index == 0 else (few, many):
            for side in [side for side in results if "failure" not in results[side]]:
                try:
                    seconds, report = run(side, steps, args, scratch)
                except RuntimeError as failure:  # one broken side must not cost the others' numbers
                    print(f"{side} failed and is left out from now on: {failure}", flush=True)
                    results[side]["failure"] = str(failure)[-3000:]
                    continue
                print(f"round {round_index}: {side}, {steps} steps: {seconds:.1f} s {report}", flush=True)
                if round_index:
                    results[side]["seconds"][steps].append(seconds)
                    results[side]["reports"].append({"steps": steps, **report})
                else:
                    results[side]["warmup_seconds"] = seconds
    for side, result in list(results.items()):
        per_step = [(b - a) / (many - few) for a, b in zip(result["seconds"][few], result["seconds"][many])]
        if not per_step:
            results.pop(side)
            continue
        # A round whose shorter run was slowed by something else on the machine gives a difference of 0 or
        # less; it stays in the record, but it is no one's best.
        best = min((seconds for seconds in per_step if seconds > 0), default=float("nan"))
        result.update(step_seconds=per_step, best_step_seconds=best, median_step_seconds=statistics.median(per_step),
                      startup_seconds=min(result["seconds"][few]) - few * best)
    return results


def display_name(source: str) -> str:
    """A source as the table shows it: a file by its name only, not this machine's path."""
    return source if source.startswith("builtin:") else Path(source).name


def markdown(r: dict) -> str:
    reference = r["sides"].get("sentence-transformers")
    batch = r.get("batch_size", 32)
    lines = [f"Machine: {describe_machine(r['machine'])}.", "",
             f"Model {r.get('model', 'all-MiniLM-L6-v2')}. "
             f"Train `{r['train']}`, validate `{r['val']}`; recipe `{Path(r['config']).name}`, "
             f"precision {r['precision']}, "
             f"{r['threads']} threads, batch {batch}, max length 128; steps {r['steps'][0]} and {r['steps'][1]}, "
             f"{r['rounds_run']} alternating round(s).", "",
             "| side | best s/step | median s/step | pairs/s (best) | start-up s | seed epoch, min "
             "| vs sentence-transformers | val Spearman |",
             "|---|---|---|---|---|---|---|---|"]
    for side, s in r["sides"].items():
        ratio = f"{reference['best_step_seconds'] / s['best_step_seconds']:.2f}x" if reference else "-"
        spearman = s["reports"][-1].get("val_spearman")
        lines.append(f"| {side} | {s['best_step_seconds']:.4f} | {s['median_step_seconds']:.4f} | "
                     f"{batch / s['best_step_seconds']:.1f} | {s['startup_seconds']:.1f} | "
                     f"{(SEED_PAIRS // batch + 1) * s['best_step_seconds'] / 60:.2f} | {ratio} | "
                     f"{spearman if spearman is None else f'{spearman:.4f}'} |")
    lines += ["", f"Measured {r['date']} with `python {r['command']}`; "
              + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + "."]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    args.config = str(Path(args.config).resolve())
    args.train, args.val = (source if source.startswith("builtin:") else str(Path(source).resolve())
                            for source in (args.train, args.val))
    if args.model is None:
        from minilm_sts.model.pretrained import DEFAULT_MODEL, resolve_pretrained

        args.model = str(resolve_pretrained(DEFAULT_MODEL))
    args.model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            args.model = str(tiny_model(args.model, Path(scratch) / "tiny-bert"))
        sides = measure(args, Path(scratch))
    result = {"train": display_name(args.train), "val": display_name(args.val), "config": args.config,
              "model": "tiny BERT: 2 layers, hidden 64" if args.tiny else display_name(args.model),
              "precision": args.precision, "batch_size": args.batch_size, "threads": args.threads, "steps": args.steps,
              "rounds_run": max((len(s["step_seconds"]) for s in sides.values()), default=0),
              "sides": sides, "versions": versions(), "machine": {**machine(), "threads": args.threads},
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
