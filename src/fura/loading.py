"""Load a model for inference or export: a plain/merged model, or an adapter directory over its base.

The evaluations and `fura export` all take "a model, or a `fura train` output directory". For an
adapter directory the base comes from ``adapter_config.json`` and is rebuilt as it was trained: in
NF4 with the run's compute dtype when ``run.json`` says ``base_4bit`` (so the adapter sees the same
quantized weights), else dense. The tokenizer comes from the adapter directory when it holds one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from fura import methods
from fura.errors import UserError

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
        raise UserError(f"unknown dtype {name!r}; valid names are: {', '.join(_DTYPES)}") from None


def hub_unavailable() -> str | None:
    """Why the Hugging Face hub cannot be reached now (offline mode, or no connection), or None when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ).upper() in ("1", "ON", "YES", "TRUE"):
        return "the hub is offline (HF_HUB_OFFLINE=1)"
    return _hub_unreachable()


@functools.lru_cache(maxsize=1)
def _hub_unreachable() -> str | None:
    """One quick TCP connection to the hub endpoint (3 s), instead of the libraries' retries with backoff."""
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError:
        return f"the hub ({constants.ENDPOINT}) is unreachable"
    return None


def _looks_like_path(text: str) -> bool:
    """Whether ``text`` can only be a filesystem path (a hub id is ``name`` or ``org/name``)."""
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1


def check_model_source(name: str | os.PathLike, key: str = "model", need: str | None = "config.json") -> str:
    """``name`` if it can be loaded: an existing local directory (holding ``need``) or a hub id that is reachable.

    Fails fast with a `UserError` naming ``key`` instead of the loaders' own errors: a local path that does
    not exist, a directory that is not a saved model, a malformed hub id, or a hub id while the hub is
    offline or unreachable and the model is not in the local cache.
    """
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.exists():
        if need and path.is_dir() and not (path / need).is_file() and not is_adapter_dir(path):
            raise UserError(f"{key} {text}: the directory holds no {need}, so it is not a saved model")
        return str(path)
    if _looks_like_path(text):
        raise UserError(f"{key} {text}: the path does not exist")
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise UserError(f"{key} {text!r}: no such local path, and not a hub id (name or org/name)") from None
    if isinstance(try_to_load_from_cache(text, need or "config.json"), str):
        return text  # in the local cache: the loaders find it offline too
    reason = hub_unavailable()
    if reason:
        raise UserError(
            f"{key} {text!r}: no such local path, and it is a hub id but {reason} and the model is not in the "
            f"local cache; pass a local directory instead (e.g. --{key.replace('_', '-')} /path/to/model)"
        )
    return text


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_model(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter was trained on, from its ``adapter_config.json``."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    try:
        base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"{config_path}: not a valid JSON object ({err})") from err
    if not base:
        raise UserError(f"{config_path} names no base model; pass the base model explicitly (--base-model)")
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
        raise UserError(f"{run_json}: base_compute_dtype must name a dtype, got {compute!r}")
    return bool(run.get("base_4bit", False)), compute


def load_for_inference(
    model_or_adapter: str | os.PathLike,
    base_model: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    base_4bit: bool | None = None,
    model_class: Any = None,
    tokenizer_class: Any = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode: a model id/directory as is, or an adapter directory over its base.

    For an adapter directory the result is the un-merged `PeftModel`. ``base_model`` overrides the base
    named in ``adapter_config.json``; ``base_4bit`` overrides run.json's ``base_4bit``. A 4-bit base is
    loaded in NF4 with the run's compute dtype (``dtype`` then applies only to dense bases). ``device``
    defaults to CUDA when available, else the CPU. ``model_class`` / ``tokenizer_class`` default to
    the checkpoint's: `AutoModelForImageTextToText` / `AutoProcessor` for a VLM, else `AutoModelForCausalLM` /
    `AutoTokenizer`.
    """
    path = check_model_source(model_or_adapter)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    load_dtype = torch_dtype(dtype)
    if not is_adapter_dir(path):
        model_cls, processor_cls = auto_classes(path, model_class, tokenizer_class)
        model = model_cls.from_pretrained(path, dtype=load_dtype).to(device)
        return model.eval(), processor_cls.from_pretrained(path)

    base = check_model_source(base_model or adapter_base_model(path), "base_model")
    model_cls, processor_cls = auto_classes(base, model_class, tokenizer_class)
    trained_4bit, compute_dtype = trained_base(path)
    if trained_4bit if base_4bit is None else base_4bit:
        logger.info("loading %s in NF4 (%s compute), as the adapter was trained", base, compute_dtype)
        kwargs = {"device_map": {"": device}} if device.type != "cpu" else {}
        model = methods.load_model(base, "qfura", model_cls, compute_dtype=compute_dtype, **kwargs)
    else:
        model = model_cls.from_pretrained(base, dtype=load_dtype).to(device)
    model = PeftModel.from_pretrained(model, path)
    tokenizer_source = path if (Path(path) / "tokenizer_config.json").is_file() else base
    return model.eval(), processor_cls.from_pretrained(tokenizer_source)


def auto_classes(
    name_or_path: str | os.PathLike, model_class: Any = None, tokenizer_class: Any = None
) -> tuple[Any, Any]:
    """(model class, tokenizer class) for a checkpoint, unless given: a vision-language model (Llava) comes with its
    processor, anything else is a causal LM with its tokenizer."""
    if model_class is not None and tokenizer_class is not None:
        return model_class, tokenizer_class
    vision = getattr(AutoConfig.from_pretrained(name_or_path), "vision_config", None) is not None
    default = (AutoModelForImageTextToText, AutoProcessor) if vision else (AutoModelForCausalLM, AutoTokenizer)
    return model_class or default[0], tokenizer_class or default[1]
