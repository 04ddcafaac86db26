"""`fura inspect`: what a fine-tune did to the spectrum of each targeted weight, against its pretrained base.

It takes a FuRA adapter, a LoRA adapter, a fully fine-tuned model, or a `fura train` run directory
holding one of those, and compares each targeted weight ``W`` with the base weight ``W0``:

* **update rank**: the numerical rank of ``ΔW = W − W0``, and its ratio to ``min(out, in)``.
  FuRA's update is full rank; LoRA's is at most ``r``.
* **out-of-subspace energy**: the share of ``‖ΔW‖²`` that lies outside the pretrained blocks' column
  spaces, ``Σ_j ‖(I − U_j U_jᵀ) ΔW_j‖² / Σ_j ‖ΔW_j‖²`` over the input blocks ``j`` (row spaces of the
  output blocks for `input_one_block`). FuRA's is 0 by construction (``W_j = W0_j·M_j``); a generic
  update has about ``1 − b/out``.
* **singular-value drift**: ``‖σ(W) − σ(W0)‖ / ‖σ(W0)‖``, and the relative size ``‖ΔW‖_F / ‖W0‖_F``.

FuRA's ``W`` is rebuilt from the adapter tensors with `fura.blocks` and `fura.implicit` (the tuner's own
math), LoRA's as ``W0 + scale·B·A``. Tensors are read one layer at a time from the safetensors files, so memory stays at
a few copies of the largest layer whatever the model size. ``docs/inspect.md`` explains each measure.

    report = inspect_update("runs/fura")              # base from run.json / adapter_config.json
    print(summary_row(report))                        # one row of the summary table the quickstart prints
    report.save("inspect.json")

The package reads, measures, then reports; each step is a module whose public names are re-exported here:

- :mod:`fura.inspect.sources`: `resolve_source` (the kind and the base) and `layer_updates` (``W0``, ``ΔW``).
- :mod:`fura.inspect.measures`: `measure` per layer, and `inspect_update`, which returns an `InspectReport`.
- :mod:`fura.inspect.report`: rich tables (`summary_row`, `summary_table`, …) and `plot_report`'s PNGs.
- :mod:`fura.inspect.cli`: ``fura inspect``'s `add_arguments` and `run`.
"""

from __future__ import annotations

from fura.inspect.cli import add_arguments, parse_block_shape, run
from fura.inspect.measures import (
    RANK_EPS,
    SPECTRUM_POINTS,
    InspectReport,
    LayerRecord,
    inspect_update,
    measure,
    numerical_rank,
    out_of_subspace,
)
from fura.inspect.report import (
    FIXED_SCALE,
    HEATMAP_MEASURES,
    SUMMARY_COLUMNS,
    layer_table,
    module_table,
    plot_report,
    summary_row,
    summary_table,
)
from fura.inspect.sources import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONV1D_MODEL_TYPES,
    MODEL_CONFIG,
    PEFT_PREFIX,
    RUN_JSON,
    BlockGrid,
    Kind,
    LayerUpdate,
    Side,
    UpdateSource,
    grid_of,
    layer_updates,
    resolve_source,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CONV1D_MODEL_TYPES",
    "FIXED_SCALE",
    "HEATMAP_MEASURES",
    "MODEL_CONFIG",
    "PEFT_PREFIX",
    "RANK_EPS",
    "RUN_JSON",
    "SPECTRUM_POINTS",
    "SUMMARY_COLUMNS",
    "BlockGrid",
    "InspectReport",
    "Kind",
    "LayerRecord",
    "LayerUpdate",
    "Side",
    "UpdateSource",
    "add_arguments",
    "grid_of",
    "inspect_update",
    "layer_table",
    "layer_updates",
    "measure",
    "module_table",
    "numerical_rank",
    "out_of_subspace",
    "parse_block_shape",
    "plot_report",
    "resolve_source",
    "run",
    "summary_row",
    "summary_table",
]
