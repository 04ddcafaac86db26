"""`fura vlm …`: tools of the visual instruction tuning track (training itself is `fura train --config vlm/…`).

fura vlm assemble --language-model DIR --vision-tower DIR --projector mm_projector.bin --output DIR
"""

from __future__ import annotations

import argparse

from fura.vlm import assemble


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vlm_command", required=True)
    assemble.add_arguments(
        sub.add_parser(
            "assemble",
            help="join Vicuna, CLIP and the stage-1 projector into a Llava checkpoint + processor",
            description=assemble.__doc__.split("\n\n")[0],
        )
    )


def run(args: argparse.Namespace) -> int:
    return {"assemble": assemble.run}[args.vlm_command](args)
