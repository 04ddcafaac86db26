"""`fura recipes`: list the shipped recipes, copy one out to edit, or print a shipped file's path.

fura recipes                          one line per recipe: name, track, method, model, paper's number
fura recipes cp commonsense/fura x.yaml
fura recipes path accelerate/fsdp     for `accelerate launch --config_file "$(fura recipes path accelerate/fsdp)"`
"""

from __future__ import annotations

import argparse

from rich.console import Console

from fura.recipes.catalog import copy_recipe, shipped_path, shipped_recipes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=False, metavar="{list,cp,path}")
    sub.add_parser("list", help="list the shipped recipes (the default)")
    cp = sub.add_parser("cp", help="copy a shipped recipe to a file or directory, to edit it")
    cp.add_argument("name", help="a shipped name, e.g. commonsense/fura")
    cp.add_argument("dest", help="the new file (or an existing directory to copy into); never overwritten")
    path = sub.add_parser("path", help="print the installed file of a shipped recipe")
    path.add_argument("name", help="a shipped name, e.g. accelerate/fsdp")


def run(args: argparse.Namespace) -> int:
    action = args.action or "list"
    out = Console(soft_wrap=True)
    if action == "cp":
        dest = copy_recipe(args.name, args.dest)
        out.print(f"copied {args.name} to {dest}; train with: fura train --config {dest}")
    elif action == "path":
        print(shipped_path(args.name))
    else:
        _print_listing(out)
    return 0


def _print_listing(out: Console) -> None:
    """One line per shipped file, in columns, so the listing reads well and greps well."""
    recipes = shipped_recipes()
    training = [(r.name, r.track, r.method, r.model, r.paper or "-") for r in recipes if r.track]
    launchers = [(r.name, r.description) for r in recipes if not r.track]
    out.print("[bold]Recipes[/bold] (fura train --config NAME; fura recipes cp NAME FILE to edit one)")
    _columns(out, [("name", "track", "method", "model", "paper"), *training])
    out.print('\n[bold]Launcher configs[/bold] (accelerate launch --config_file "$(fura recipes path NAME)" ...)')
    _columns(out, [("name", "what"), *launchers])


def _columns(out: Console, rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    for n, row in enumerate(rows):
        line = "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + str(row[-1])
        out.print(line, style="dim" if n == 0 else None, markup=False, highlight=False, crop=False, overflow="ignore")
