"""FuRA as a PEFT method: config, layer, tuner model, load-time checks and registration."""

from fura.tuner.checks import AdapterLoadError
from fura.tuner.config import FuraConfig
from fura.tuner.layer import FuraLayer, FuraLinear, LayerSpec
from fura.tuner.model import FuraModel
from fura.tuner.spec import layer_spec

__all__ = ["AdapterLoadError", "FuraConfig", "FuraLayer", "FuraLinear", "FuraModel", "LayerSpec", "layer_spec"]
