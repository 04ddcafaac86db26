"""Loading a saved FuRA adapter as one transaction: begin, inject, verify, and roll back on a refusal.

`AdapterLoading` holds the sequence and documents where PEFT calls each step. `Rollback` is the way
back from one injection; every injection takes one, a load keeps it until its checkpoint is verified.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from fura.errors import UserError
from fura.tuner.checks import (
    CONFIG_NAME,
    AdapterLoadError,
    ModelSnapshot,
    adapter_tensors,
    check_adapter_directory,
    check_weights_checksum,
)
from fura.tuner.state_check import validate_adapter_state

# The one attribute through which a load travels with its config (see AdapterLoading); only AdapterLoading uses it.
_ON_CONFIG = "_fura_adapter_loading"


class Rollback:
    """The way back from one `inject_adapter` call: a snapshot of the model and the tuner's lists of targets.

    Taking it copies no tensor (see `ModelSnapshot`), so every injection takes one.
    """

    def __init__(self, tuner: BaseTuner, model: nn.Module) -> None:
        self.tuner = tuner
        self.snapshot = ModelSnapshot(model)
        self.targeted_modules = list(tuner.targeted_module_names)
        self.targeted_parameters = list(getattr(tuner, "targeted_parameter_names", []))

    def __call__(self) -> None:
        """Put the model, and the tuner's lists of targeted modules and parameters, back as they were."""
        self.snapshot.restore()
        self.tuner.targeted_module_names[:] = self.targeted_modules
        if hasattr(self.tuner, "targeted_parameter_names"):
            self.tuner.targeted_parameter_names[:] = self.targeted_parameters


class AdapterLoading:
    """One load of a saved FuRA adapter: it fits and is loaded whole, or it is refused and the model is left as it was.

    PEFT has no load hook, so each step runs inside one of PEFT's calls. ``PeftModel.from_pretrained(model, path)``
    calls into fura in this order:

    1. ``PeftConfig._get_peft_type(path)`` reads ``peft_type`` from adapter_config.json (fura's wrapper,
       `fura.tuner.registration`, names the file when it is not valid JSON or has no ``peft_type``).
    2. ``FuraConfig.from_pretrained(path)`` → `begin`: the files are checked (JSON with every layout key,
       a readable safetensors header, never pickle), the config is parsed, and the weights file is
       compared with its saved SHA-256. The checksum's verdict waits for step 5, whose tensor checks say more.
    3. ``FuraModel.__init__`` → ``FuraModel.inject_adapter`` → `inject`: PEFT's injection, under
       ``init_empty_weights`` with ``low_cpu_mem_usage=True`` (`FuraModel._prepare_model` checks every target
       before any layer changes). An error rolls it back; the load keeps the `Rollback` for step 5.
    4. ``FuraModel._cast_adapter_dtype``.
    5. ``PeftModel.load_adapter(path, adapter_name)``: ``load_peft_weights`` reads the tensors and
       ``set_peft_model_state_dict`` calls ``FuraModel._remap_adapter_state_dict_for_load`` → `verify`: shapes,
       finite values and the base weights' fingerprints (`validate_adapter_state`), then the checksum. A refusal
       rolls the injection back and removes the adapter's config. The load ends here either way.
    6. ``set_peft_model_state_dict`` loads the tensors (``load_state_dict``, with ``assign=True`` under
       ``low_cpu_mem_usage``); ``load_adapter`` then calls ``_cast_adapter_dtype`` again.

    ``PeftModel.load_adapter(path, name)`` of a new adapter makes calls 1 and 2 itself, then
    ``PeftModel.add_adapter`` (3, 4), then 5 and 6. Loading into an adapter the model already has (a Trainer
    resume) makes only calls 5 and 6: no load begins and `verify` only checks the tensors
    (`fura.tuner.checks.verify_saved_adapters` is the checksum check for that case).

    How the load travels: the config object that step 2 returns is the only thing PEFT hands on to step 3
    (as ``tuner.peft_config[adapter_name]``) and step 5 (as ``config``), and a dataclass config has no hash to
    key a registry with. So `begin` attaches the load to that config object, as one private attribute that
    only this class reads and writes (`pending`). No state can pass from one load to another: each
    ``FuraConfig.from_pretrained`` makes a new config; a load ends when its injection fails or its checkpoint
    is verified; its rollback is used only on the model it was taken on, for the same adapter, and only while
    that adapter's tensors are unchanged since the injection; and a copy of the config carries no load.
    """

    def __init__(self, config_path: str, checksum_problem: str | None) -> None:
        self.config_path = config_path
        self.checksum_problem = checksum_problem
        self.adapter_name: str | None = None
        self.rollback: Rollback | None = None
        self.versions: list[tuple[torch.Tensor, int]] = []

    def __deepcopy__(self, memo: dict) -> None:
        """A deep copy of a config (PEFT's ``save_pretrained`` makes one) is not being loaded, and copies no model."""
        return None

    @staticmethod
    def pending(config: PeftConfig) -> AdapterLoading | None:
        """The load that ``config`` is part of, between `begin` and its end; None for any other config."""
        return config.__dict__.get(_ON_CONFIG)

    @classmethod
    def begin(cls, directory: str, read_config: Callable[[], PeftConfig], required_keys: Collection[str]) -> PeftConfig:
        """Step 2: check the adapter's files, parse its config with ``read_config``, and start the load on it.

        Raises:
            AdapterLoadError: a file is missing a layout key, not valid JSON, truncated, or pickle only, or
                the config holds a value FuRA refuses. The model has not been touched yet.
        """
        check_adapter_directory(directory, required_keys=required_keys)
        config_path = os.path.join(directory, CONFIG_NAME)
        try:
            config = read_config()
        except (ValueError, TypeError) as err:
            if isinstance(err, AdapterLoadError):
                raise
            raise AdapterLoadError(f"{config_path}: {err}") from err
        problem = check_weights_checksum(directory, config.weights_sha256)
        config.__dict__[_ON_CONFIG] = cls(config_path, problem)
        return config

    @classmethod
    def inject(cls, tuner: BaseTuner, model: nn.Module, adapter_name: str, run: Callable[[], None]) -> None:
        """Step 3, and every other injection: run PEFT's injection ``run`` so that any error leaves ``model`` as it was.

        For a load, an error in the config's values is reported as the adapter not fitting the model, and
        on success the rollback is kept for `verify`.

        Raises:
            AdapterLoadError: the loaded config's modules or shapes do not fit this model.
        """
        config = tuner.peft_config[adapter_name]
        loading = cls.pending(config)
        if loading is not None and loading.rollback is not None:
            loading = None  # its injection was done: this is another use of the same config, not the load
        rollback = Rollback(tuner, model)
        try:
            run()
        except BaseException as err:
            rollback()
            if loading is not None:
                del config.__dict__[_ON_CONFIG]
                if isinstance(err, UserError) and not isinstance(err, AdapterLoadError):
                    raise AdapterLoadError(f"{loading.config_path} does not fit this model: {err}") from err
            raise
        if loading is not None:
            loading.adapter_name, loading.rollback = adapter_name, rollback
            loading.versions = [(tensor, tensor._version) for _, tensor in adapter_tensors(model, adapter_name)]

    @classmethod
    def verify(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> None:
        """Step 5: refuse a checkpoint that does not fit before any of it is loaded, and undo the load's injection.

        ``model`` is the `PeftModel` and ``state_dict`` the checkpoint with its keys mapped to it. An adapter
        the model had before the load is left as it was.

        Raises:
            AdapterLoadError: a tensor is missing, misshapen or not finite, the base weights are not those the
                adapter was made from, or the file does not match its checksum.
        """
        loading = config.__dict__.pop(_ON_CONFIG, None)
        rollback = loading.rollback_for(model, adapter_name) if loading is not None else None
        try:
            validate_adapter_state(model, adapter_name, state_dict, config.fingerprint_tolerance)
            if loading is not None and loading.checksum_problem:
                raise AdapterLoadError(f"cannot load FuRA adapter '{adapter_name}': {loading.checksum_problem}")
        except AdapterLoadError:
            if rollback is not None:
                rollback()
                rollback.tuner.peft_config.pop(adapter_name, None)
            raise

    def rollback_for(self, model: nn.Module, adapter_name: str) -> Rollback | None:
        """This load's rollback, if it applies: taken on ``model``'s tuner for ``adapter_name``, tensors unchanged."""
        rollback = self.rollback
        if (
            rollback is None
            or adapter_name != self.adapter_name
            or getattr(model, "base_model", None) is not rollback.tuner
        ):
            return None
        return rollback if all(tensor._version == version for tensor, version in self.versions) else None
