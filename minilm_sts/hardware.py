"""What the machine can do and what it is: the precision a CPU trains well in, and the description that the run
record, the model card and every benchmark carry, so figures from different machines are never read as one."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from minilm_sts._compat import cpu_has_native_bf16

# Asked for on a CPU, each of these runs in bf16 (Lightning turns 16-mixed into bf16-mixed there).
BF16_ON_CPU = {"16-mixed", "bf16-mixed", "16", "bf16"}
# Measured: a 12-step fit on STS-B took 209.3 s in bf16-mixed against 30.4 s in 32-true on a 2-core AMD EPYC
# with AVX2 and no native bf16 (torch 2.13.0+cpu), about 13x once start-up is taken out.
EMULATED_BF16_SLOWDOWN = "about 13x"


def cpu_name() -> str:
    """The CPU's model name as the operating system gives it (Linux's /proc/cpuinfo), else the platform's."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where this process runs, in plain values (checkpoints load weights_only): CPU model, torch's CPU
    capability (the widest vector instructions its kernels use), native bf16, threads, and the GPU if any."""
    found = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "native_bf16": bool(cpu_has_native_bf16()), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def describe_machine(found: dict) -> str:
    """One line for a table header or a card: `AMD EPYC (AVX512, native bf16), 2 threads[, GPU ...]`."""
    bf16 = "native bf16" if found.get("native_bf16") else "no native bf16"
    line = f"{found.get('cpu', '?')} ({found.get('cpu_capability', '?')}, {bf16}), {found.get('threads', '?')} threads"
    return line + (f", GPU {found['gpu']}" if found.get("gpu") else "")


def cpu_precision(asked: str, asked_on_command_line: bool, native_bf16: bool) -> tuple[str, str | None, bool]:
    """The precision a CPU run trains in, and the line that says why when it differs from the plain request:
    (precision, message or None, whether the message is a warning).

    bf16 pays only where the CPU computes it natively (AVX-512 BF16 or AMX); elsewhere it is emulated and a
    step runs about 13x slower than fp32. A mixed precision that a recipe asks for then becomes 32-true; one
    the user typed on the command line is kept, with a warning."""
    if str(asked) not in BF16_ON_CPU or native_bf16:
        return str(asked), None, False
    capability = torch.backends.cpu.get_cpu_capability()
    why = f"this CPU ({cpu_name()}, {capability}) has no native bf16 (AVX-512 BF16 or AMX), so bf16 is emulated"
    if asked_on_command_line:
        return str(asked), (f"--trainer.precision {asked} kept as given, but {why}: expect it {EMULATED_BF16_SLOWDOWN} "
                            "slower than --trainer.precision 32-true"), True
    return "32-true", (f"Precision: the recipe asks for {asked}; training in 32-true, because {why} and runs "
                       f"{EMULATED_BF16_SLOWDOWN} slower (--trainer.precision {asked} on the command line "
                       "keeps it)"), False
