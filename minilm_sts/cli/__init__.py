"""The command line: `python -m minilm_sts fit|validate|test|export|predict|build-pairs|mine-negatives` and what it
adds to a run (recipes, tracking, the fit plan, export of the best checkpoint)."""

from minilm_sts.cli.commands import main

__all__ = ["main"]

from minilm_sts._deprecated import module_getattr  # noqa: E402 (after main, which the entry point needs)

__getattr__ = module_getattr("cli")  # the names of the flat layout's cli.py, until 0.3
