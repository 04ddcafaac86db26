"""Load a model for inference or export: a plain/merged model, or an adapter directory over its base.

The evaluations and `fura export` all take "a model, or a `fura train` output directory". For an
adapter directory the base comes from ``adapter_config.json`` and is rebuilt as it was trained: in
NF4 with the run's compute dtype when ``run.json`` says ``base_4bit`` (so the adapter sees the same
quantized weights), else dense. The tokenizer comes from the adapter directory when it holds one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

#: Compute dtype assumed for a 4-bit base when run.json predates the ``base_compute_dtype`` key.
DEFAULT_COMPUTE_DTYPE = torch.bfloat16


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | str | None:
    """The torch dtype a name means (``bf16``, ``bfloat16``, ``torch.float16``, …); ``"auto"`` and None pass through.

    An unknown name fails with the list of valid ones (``getattr(torch, "bf16")`` would not say what went wrong).
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid names are: {', '.join(_DTYPES)}") from None


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_model(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter was trained on, from its ``adapter_config.json``."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path} names no base model; pass the base model explicitly (--base-model)")
    return base


def trained_base(adapter_dir: str | os.PathLike) -> tuple[bool, torch.dtype]:
    """(base was 4-bit, its compute dtype), from the run.json `fura train` writes beside the adapter.

    Without run.json the base was dense; without ``base_compute_dtype`` (older runs) it is bfloat16,
    the QLoRA default the recipes used.
    """
    run_json = Path(adapter_dir) / "run.json"
    run = json.loads(run_json.read_text()) if run_json.is_file() else {}
    compute = torch_dtype(run.get("base_compute_dtype") or DEFAULT_COMPUTE_DTYPE)
    if not isinstance(compute, torch.dtype):
        raise ValueError(f"{run_json}: base_compute_dtype must name a dtype, got {compute!r}")
    return bool(run.get("base_4bit", False)), compute


def load_for_inference(
    model_or_adapter: str | os.PathLike,
    base_model: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    base_4bit: bool | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode: a model id/directory as is, or an adapter directory over its base.

    For an adapter directory the result is the un-merged `PeftModel`. ``base_model`` overrides the base
    named in ``adapter_config.json``; ``base_4bit`` overrides run.json's ``base_4bit``. A 4-bit base is
    loaded in NF4 with the run's compute dtype (``dtype`` then applies only to dense bases). ``device``
    defaults to CUDA when available, else the CPU.
    """
    from fura import methods

    path = os.fspath(model_or_adapter)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    load_dtype = torch_dtype(dtype)
    if not is_adapter_dir(path):
        model_cls, processor_cls = auto_classes(path)
        model = model_cls.from_pretrained(path, dtype=load_dtype).to(device)
        return model.eval(), processor_cls.from_pretrained(path)

    from peft import PeftModel

    base = base_model or adapter_base_model(path)
    model_cls, processor_cls = auto_classes(base)
    trained_4bit, compute_dtype = trained_base(path)
    if trained_4bit if base_4bit is None else base_4bit:
        logger.info("loading %s in NF4 (%s compute), as the adapter was trained", base, compute_dtype)
        kwargs = {"device_map": {"": device}} if device.type != "cpu" else {}
        model = methods.load_model(base, "qfura", compute_dtype=compute_dtype, **kwargs)
    else:
        model = model_cls.from_pretrained(base, dtype=load_dtype).to(device)
    model = PeftModel.from_pretrained(model, path)
    tokenizer_source = path if (Path(path) / "tokenizer_config.json").is_file() else base
    return model.eval(), processor_cls.from_pretrained(tokenizer_source)


def auto_classes(name_or_path: str | os.PathLike) -> tuple[Any, Any]:
    """(model class, tokenizer class) for a checkpoint: a vision-language model (Llava) comes with its processor."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    if getattr(AutoConfig.from_pretrained(name_or_path), "vision_config", None) is not None:
        return AutoModelForImageTextToText, AutoProcessor
    return AutoModelForCausalLM, AutoTokenizer
