"""docs/design.md#glossary names code: every name it gives must exist, so a rename cannot leave it behind."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from fura import blocks, implicit
from fura.tuner import layer, model, spec
from fura.tuner.layer import FuraLayer, LayerSpec

GLOSSARY = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text().split("## Glossary")[1]
GLOSSARY = GLOSSARY.split("\n## ")[0]

MODULES = {"blocks": blocks, "implicit": implicit, "tuner.layer": layer, "tuner.model": model, "tuner.spec": spec}
DATACLASSES = {"LayerSpec": LayerSpec, "Factorization": blocks.Factorization}
DATACLASSES["ExplicitFactorization"] = blocks.ExplicitFactorization


def _named(pattern: str) -> list[tuple[str, ...]]:
    found = re.findall(pattern, GLOSSARY)
    assert found, f"the glossary names nothing matching {pattern}"
    return found


def test_glossary_module_functions_exist():
    for module, name in _named(r"`(blocks|implicit|tuner\.layer|tuner\.model|tuner\.spec)\.(\w+)`"):
        assert hasattr(MODULES[module], name), f"glossary: {module}.{name} does not exist"


def test_glossary_dataclass_fields_exist():
    for cls, name in _named(r"`(LayerSpec|Factorization|ExplicitFactorization)\.(\w+)`"):
        fields = {field.name for field in dataclasses.fields(DATACLASSES[cls])}
        assert name in fields, f"glossary: {cls} has no field {name!r}"
    for name in _named(r"`(sigma_trainable|train_left|train_right|block_size|m_blocks|out_block_size)`"):
        assert name in {field.name for field in dataclasses.fields(LayerSpec)}


def test_glossary_saved_names_and_modes_exist():
    saved = set(FuraLayer.adapter_layer_names) | set(FuraLayer.other_param_names)
    for name in _named(r"`(fura_\w+)`"):
        assert name in saved, f"glossary: {name} is not a saved FuRA tensor name"
    for constant in _named(r"`((?:OUTPUT|INPUT)_ONE_BLOCK|EXPLICIT)`"):
        assert hasattr(layer, constant), f"glossary: fura.tuner.layer has no {constant}"
    assert {layer.OUTPUT_ONE_BLOCK, layer.INPUT_ONE_BLOCK} <= set(_named(r'"(\w+_one_block)"'))
