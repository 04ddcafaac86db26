"""Make "fura" a PEFT method: peft's own `register_peft_method`, over the `PeftType` member `fura.tuner.peft_type` adds.

peft ≥ 0.15 has `register_peft_method`, but it accepts only names that are already members of the
`PeftType` enum. A package outside peft therefore has to add its member first. `import fura` does
both steps, so `PeftModel.from_pretrained` finds FuRA adapters with no extra call.
"""

from __future__ import annotations

import json

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from fura.tuner.checks import AdapterLoadError
from fura.tuner.config import FuraConfig
from fura.tuner.model import FuraModel
from fura.tuner.peft_type import FURA_PEFT_TYPE, NAME, PREFIX


def _name_the_file_on_bad_json() -> None:
    """Make peft's first read of ``adapter_config.json`` name the file when it is not valid JSON or has no peft_type.

    `PeftModel.from_pretrained` reads the config through `PeftConfig._get_peft_type` before any
    FuRA code runs. A corrupt file would otherwise surface as a bare JSONDecodeError that names
    no file, and a missing ``peft_type`` as a bare KeyError. This only changes the message; valid
    files are untouched.
    """
    original = PeftConfig._get_peft_type.__func__
    if getattr(original, "_fura_wrapped", False):
        return

    def _get_peft_type(cls, model_id: str, **kwargs):
        try:
            return original(cls, model_id, **kwargs)
        except json.JSONDecodeError as err:
            raise AdapterLoadError(f"adapter_config.json in {model_id} is not valid JSON: {err}") from err
        except KeyError as err:
            raise AdapterLoadError(
                f"adapter_config.json in {model_id} has no {err}: it does not say which PEFT method made the "
                'adapter (a FuRA adapter has "peft_type": "FURA")'
            ) from err

    _get_peft_type._fura_wrapped = True
    PeftConfig._get_peft_type = classmethod(_get_peft_type)


def register() -> None:
    """Register FuraConfig / FuraModel with peft. This is idempotent."""
    _name_the_file_on_bad_json()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(FURA_PEFT_TYPE) is FuraModel:
        return
    register_peft_method(name=NAME, config_cls=FuraConfig, model_cls=FuraModel, prefix=PREFIX)
