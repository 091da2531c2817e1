"""The packaged recipes (LightningCLI configs in recipes/), so that `--config duplicates` works after a plain
`pip install`, with no checkout beside it. `--config path.yaml` still names a file of the user's."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from minilm_sts.errors import UserInputError

RECIPES = resources.files("minilm_sts") / "cli" / "recipes"
CONFIG_OPTIONS = ("-c", "--config")
RECIPE_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a bare name: no path, no suffix, no inline YAML


def packaged_recipes() -> list[str]:
    return sorted(entry.name.removesuffix(".yaml") for entry in RECIPES.iterdir() if entry.name.endswith(".yaml"))


def recipe_path(name: str) -> str:
    """The file of the packaged recipe `name` (`stsb`, `duplicates`, ...)."""
    return str(RECIPES / f"{name}.yaml")


def with_recipe_paths(command_line: list[str]) -> list[str]:
    """The command line with each `--config NAME` that names no file replaced by the packaged recipe NAME's path,
    or a clear error when there is no such recipe either."""
    resolved = list(command_line)
    for i, arg in enumerate(command_line):
        option, _, value = arg.partition("=")
        if arg in CONFIG_OPTIONS and i + 1 < len(command_line):
            resolved[i + 1] = _resolved(command_line[i + 1])
        elif option in CONFIG_OPTIONS and value:
            resolved[i] = f"{option}={_resolved(value)}"
    return resolved


def _resolved(value: str) -> str:
    if Path(value).exists() or not RECIPE_NAME.fullmatch(value):
        return value
    if value in packaged_recipes():
        return recipe_path(value)
    raise UserInputError(f"--config {value}: no such file, and no packaged recipe of that name; the packaged "
                         f"recipes are {', '.join(packaged_recipes())} (or give a path to a .yaml file)")
