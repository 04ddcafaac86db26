"""Controlled experiments that compare FuRA with LoRA and full fine-tuning: `fura quickstart` (a synthetic world) and
`fura experiment sentiment` (all-MiniLM-L6-v2 on VADER's human ratings).

Both follow one protocol and share its parts:

- `runner`: each setting's learning rate picked from a grid on the first seed by clean validation
  accuracy (ties keep the smaller rate), then the other seeds at that rate; every grid run scored;
- `stats`: mean ± std, paired per-seed differences with a 95 % interval, orderings, linear CKA;
- `frontier`: accuracy–retention points at every grid rate, compared at matched accuracy;
- `plots`: bars with std error bars, and the frontiers;
- `report`: the printed paired and frontier lines; `console`: progress bars, quiet libraries;
- `output`: the output directory and results.json.

Each experiment is a subpackage: `quickstart` and `sentiment`.
"""
