"""The recipes that ship inside the package: list them, find one by name, copy one out to edit.

A shipped recipe is a YAML file under ``fura/configs/<group>/<name>.yaml`` (package data, so it is in
the wheel). Its name is ``<group>/<name>``, e.g. ``commonsense/fura``. Training recipes carry a
``track``; the ``accelerate/*`` files (and ``vlm/accelerate_zero3``) are launcher configs for
``accelerate launch --config_file``. A recipe's first comment line describes it; its ``paper`` key,
where there is one, holds the number the paper reports for that recipe.
"""

from __future__ import annotations

import difflib
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from fura.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class ShippedRecipe:
    """One shipped YAML file and what its listing shows."""

    name: str
    path: Path
    description: str
    track: str | None  # None for launcher configs
    method: str | None
    model: str | None
    paper: str | None


def _describe(path: Path) -> ShippedRecipe:
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0] if text else ""
    content = yaml.safe_load(text) or {}
    is_recipe = isinstance(content, dict) and "track" in content
    paper = content.get("paper") if is_recipe else None
    return ShippedRecipe(
        name=path.relative_to(RECIPE_DIR).with_suffix("").as_posix(),
        path=path,
        description=first.lstrip("#").strip(),
        track=content["track"] if is_recipe else None,
        method=content.get("method") if is_recipe else None,
        model=content.get("model") if is_recipe else None,
        paper=None if paper is None else str(paper),
    )


def shipped_recipes() -> list[ShippedRecipe]:
    """Every shipped YAML file, training recipes and launcher configs alike, sorted by name."""
    return [_describe(path) for path in sorted(RECIPE_DIR.glob("*/*.yaml"))]


def shipped_names() -> list[str]:
    return [path.relative_to(RECIPE_DIR).with_suffix("").as_posix() for path in sorted(RECIPE_DIR.glob("*/*.yaml"))]


def resolve(name_or_path: str | Path) -> Path:
    """The file a ``--config`` value means: an existing path wins, then a shipped name (``.yaml`` optional).

    Raises:
        UserError: neither a file nor a shipped name; the message lists the closest shipped names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        raise UserError(f"recipe {path} is a directory, not a YAML file")
    if path.is_absolute():
        raise UserError(f"recipe {path} does not exist")
    return shipped_path(str(name_or_path))


def shipped_path(name: str) -> Path:
    """The installed file of shipped recipe ``name`` (``.yaml`` optional).

    Raises:
        UserError: no shipped recipe has that name; the message lists the closest shipped names (a name ending in
            ``.yaml`` is said to be neither a file nor a shipped recipe, without guesses).
    """
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    names = shipped_names()
    if stem in names:
        return RECIPE_DIR / f"{stem}.yaml"
    if stem != name:
        raise UserError(f"recipe {name} does not exist and is not a shipped recipe (`fura recipes` lists them)")
    same_leaf = [n for n in names if n.rsplit("/", 1)[-1] == stem.rsplit("/", 1)[-1]]
    close = same_leaf + [n for n in difflib.get_close_matches(stem, names, n=4, cutoff=0.5) if n not in same_leaf]
    hint = f"; close matches: {', '.join(close[:4])}" if close else ""
    raise UserError(f"recipe {name} is neither a file nor a shipped recipe{hint} (`fura recipes` lists them)")


def copy_recipe(name: str, dest: str | Path) -> Path:
    """Copy shipped recipe ``name`` to ``dest`` (a file, or a directory to copy into) and return the new file.

    Raises:
        UserError: ``name`` is not shipped, or the file ``dest`` names exists already (it is never replaced).
    """
    source = shipped_path(name)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists():
        raise UserError(f"{dest} already exists; choose another name or move it aside first")
    if not dest.parent.is_dir():
        raise UserError(f"cannot copy to {dest}: directory {dest.parent} does not exist")
    shutil.copyfile(source, dest)
    return dest
