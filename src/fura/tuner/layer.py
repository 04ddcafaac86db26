"""The FuRA tuner layer: the frozen base layer, and per adapter the transform ``M = B·diag(σ)·R``.

In `output_one_block` mode, the forward of one adapter is ``base(M x)``. That is
``W0·(M x) = L·S·R·x``, the paper's function of (R, S), computed without building L.
`input_one_block` is the mirror image: ``Mᵀ·(base(x) − bias) + bias``. What that form cannot
express (`train_position` large/both, `square` grids, a small core L over several input blocks)
uses the explicit layout: L, S and R stored as tensors, and the forward ``x·W(L, S, R)ᵀ + bias``
in place of the base weight. `fura.blocks` and `fura.implicit` hold the math, and docs/design.md#glossary
the words (B is the frozen left factor that stands for L). This file holds only PEFT's bookkeeping:
several adapters, enable and disable, merge and unmerge, dtypes.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F

from fura import bases, blocks, implicit
from fura.errors import UserError
from fura.tuner.checks import adapter_tensors, refuse_non_finite

logger = logging.getLogger(__name__)

OUTPUT_ONE_BLOCK = "output_one_block"  # blocked weight A = W: the input dimension is cut into blocks
INPUT_ONE_BLOCK = "input_one_block"  # blocked weight A = Wᵀ: the output dimension is cut into blocks
EXPLICIT = "explicit"  # the paper's layout: L, S, R stored over an m × n grid of W itself


@dataclass(frozen=True)
class LayerSpec:
    """Resolved shape of one adapter on one layer: layout, blocked side, block grid, rank, where S lives, what trains.

    In the implicit layouts (``mode`` OUTPUT_ONE_BLOCK or INPUT_ONE_BLOCK) the blocked weight's split is ``n_blocks``
    blocks of ``block_size``. In the explicit layout W is an ``m_blocks × n_blocks`` grid of
    ``out_block_size × block_size`` blocks. ``train_left``/``train_right`` say which of the paper's
    cores train: L (output side) and R (input side).
    """

    mode: str
    n_blocks: int
    block_size: int
    rank: int
    s_side: str  # where S is merged: "keep", "right", "left" or "split" (see blocks.factorize)
    sigma_trainable: bool
    train_left: bool
    train_right: bool
    m_blocks: int = 1  # explicit layout only
    out_block_size: int = 0  # explicit layout only
    matrices: int = 1  # how many weights of this shape the layer adapts alike: E·(gate and up) on MoE experts

    @property
    def explicit(self) -> bool:
        return self.mode == EXPLICIT

    @property
    def trainable_count(self) -> int:
        sigma = self.m_blocks * self.n_blocks * self.rank if self.sigma_trainable else 0
        if not self.explicit:
            return self.matrices * (self.n_blocks * self.rank * self.block_size + sigma)
        per_rank = self.out_block_size * self.train_left + self.block_size * self.train_right
        return self.matrices * (self.m_blocks * self.n_blocks * self.rank * per_rank + sigma)


def explicit_in_mixed_batch_message(names: list[str]) -> str:
    """The error for explicit-layout adapters named in ``adapter_names``."""
    return (
        f"FuRA adapter(s) {names} use the explicit L·S·R layout, which replaces the whole weight, so they cannot serve "
        "some rows of a mixed-adapter batch (adapter_names=...); run them one at a time with set_adapter(), "
        "or train them in the implicit layout (train_position='small', decomp_mode output_one_block/input_one_block)"
    )


def _creation_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype adapters are built in from the factorization: fp64 on fp64 bases, fp32 otherwise."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def blocked_weight(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """The blocked weight A of an implicit ``mode``: ``weight`` (W, or a stack) or its transpose; its own inverse."""
    return weight if mode == OUTPUT_ONE_BLOCK else weight.mT


def base_features(base: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a supported base layer: Linear, quantized Linear or GPT-2 Conv1D."""
    if _is_conv1d(base):
        in_features, out_features = base.weight.shape
        return out_features, in_features
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return base.out_features, base.in_features
    raise TypeError(f"FuRA supports nn.Linear, GPT-2 Conv1D and quantized linear layers, not {type(base).__name__}")


class FuraLayer(BaseTunerLayer):
    """State and bookkeeping shared by FuRA layers. Adapters are keyed by name, as in every PEFT tuner."""

    adapter_layer_names = ("fura_core", "fura_sigma", "fura_left", "fura_right")
    other_param_names = ("fura_basis", "fura_fingerprint", "fura_spec")
    weight_name = "weight"  # the base layer's attribute that holds the adapted weight

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.fura_core = nn.ParameterDict({})  # implicit: the blocked weight's R (n, r, b); saved name kept
        self.fura_sigma = nn.ParameterDict({})  # σ, the diagonal of S
        self.fura_left = nn.ParameterDict({})  # explicit layout: L (m·n, a, r)
        self.fura_right = nn.ParameterDict({})  # explicit layout: R (m·n, r, b)
        self.fura_basis = BufferDict({}, persistent=True)  # implicit: the left factor B (n, b, r); saved name kept
        self.fura_fingerprint = BufferDict({}, persistent=True)
        self.fura_spec: dict[str, LayerSpec] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._premerge: dict[str, Any] | None = None  # bases.weight_state of the base before the first merge
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.quantization_backend = bases.quantization_backend(base)  # refuses quantizers FuRA does not support
        self.is_conv1d = _is_conv1d(base)
        self.out_features, self.in_features = self._base_features(base)

    def _base_features(self, base: nn.Module) -> tuple[int, int]:
        """(out_features, in_features) of each adapted weight."""
        return base_features(base)

    # ----------------------------------------------------------------------------------------- weights
    def dense_weight(self) -> torch.Tensor:
        """The base weight as a plain (out × in) tensor, dequantized if the base is quantized."""
        base = self.get_base_layer()
        weight = base.weight.data if self.quantization_backend is None else bases.dequantize_weight(base)
        return weight.T if self.is_conv1d else weight

    def _to_base_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """An (out × in) weight as the base layer stores it (transposed in a GPT-2 Conv1D)."""
        return weight.T if self.is_conv1d else weight

    @staticmethod
    def apply_transform(weight: torch.Tensor, mode: str, transform: torch.Tensor) -> torch.Tensor:
        """``weight`` (out × in, or a stack) with one implicit adapter's ``blockdiag(M)`` on its blocked side."""
        return blocked_weight(implicit.merge_into(blocked_weight(weight, mode), transform), mode)

    def update_layer(
        self,
        adapter_name: str,
        spec: LayerSpec,
        init_weights: bool = True,
        factorization_dtype: str = "auto",
        inference_mode: bool = False,
        empty: bool = False,
        **kwargs: Any,
    ) -> None:
        """Add adapter ``adapter_name``: factorize the base weight block-wise and store R, S and B.

        With ``empty`` (PEFT's ``low_cpu_mem_usage=True`` load path) the tensors are only allocated,
        uninitialised, and the checkpoint fills them: loading then needs no SVD at all.
        """
        if spec.explicit:
            self._update_explicit(adapter_name, spec, init_weights, factorization_dtype, inference_mode, empty)
            return
        weight = self.dense_weight()
        blocked = blocked_weight(weight, spec.mode)
        if blocked.shape[-1] != spec.n_blocks * spec.block_size:
            dim = blocked.shape[-1]
            raise ValueError(f"block shape {spec.n_blocks}×{spec.block_size} does not cover dimension {dim}")
        # Created in fp32 (fp64 on fp64 bases); FuraModel._cast_adapter_dtype then casts to the final dtype.
        dtype = _creation_dtype(weight)
        if empty:
            n, b, r = spec.matrices * spec.n_blocks, spec.block_size, spec.rank
            where = {"device": weight.device, "dtype": dtype}
            sigma = torch.empty(n, r, **where) if spec.s_side == "keep" else None
            fac = blocks.Factorization(torch.empty(n, b, r, **where), torch.empty(n, r, b, **where), sigma)
        else:
            # One fp32 copy of a half-precision weight serves the factorization and the fingerprint.
            source = blocks.float_weight(weight)
            blocked = blocked_weight(source, spec.mode)
            fac = blocks.factorize(blocked, spec.n_blocks, spec.rank, spec.s_side, dtype=factorization_dtype)
        # Contiguous, so that a reloaded adapter (contiguous from the file) computes bit for bit the same.
        right, sigma = fac.right.to(dtype).contiguous(), None if fac.sigma is None else fac.sigma.to(dtype)
        if not init_weights:  # a deterministic-under-seed, non-identity start, as PEFT methods offer for tests
            right = right + 0.1 * torch.randn_like(right) * right.abs().mean()
            if sigma is not None:
                sigma = sigma * (1 + 0.1 * torch.randn_like(sigma))
        self.fura_spec[adapter_name] = spec
        self.fura_core[adapter_name] = nn.Parameter(right)
        if sigma is not None:
            self.fura_sigma[adapter_name] = nn.Parameter(sigma)
            if not spec.sigma_trainable:
                frozen = dict(self.frozen_peft_weight_names)
                frozen[adapter_name] = ("fura_sigma",)
                self.frozen_peft_weight_names = frozen
        self.fura_basis[adapter_name] = fac.left_factor.to(dtype).contiguous()
        sketch = torch.empty(blocks.FINGERPRINT_SIZE, device=weight.device) if empty else blocks.fingerprint(source)
        self.fura_fingerprint[adapter_name] = sketch
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _update_explicit(
        self,
        adapter_name: str,
        spec: LayerSpec,
        init_weights: bool,
        factorization_dtype: str,
        inference_mode: bool,
        empty: bool,
    ) -> None:
        """Add an explicit-layout adapter: L, S and R over the spec's grid; the cores that do not train are frozen.

        Frozen cores are frozen parameters, not buffers, because ZeRO-3/FSDP shard only parameters
        and a frozen core can be as large as W.
        """
        weight = self.dense_weight()
        k, a, b, r = spec.m_blocks * spec.n_blocks, spec.out_block_size, spec.block_size, spec.rank
        if r < min(a, b):
            warnings.warn(
                f"FuRA explicit layout at rank {r} < full rank {min(a, b)}: W ≈ L·S·R is a lossy compression, "
                "so the adapted model does not start from the base model",
                stacklevel=2,
            )
        dtype = _creation_dtype(weight)
        if empty:
            where = {"device": weight.device, "dtype": dtype}
            sigma = torch.empty(k, r, **where) if spec.s_side == "keep" else None
            fac = blocks.ExplicitFactorization(torch.empty(k, a, r, **where), torch.empty(k, r, b, **where), sigma)
        else:
            fac = blocks.factorize_explicit(
                weight.detach(), spec.m_blocks, spec.n_blocks, r, spec.s_side, dtype=factorization_dtype
            )
        tensors = {"fura_left": fac.left, "fura_right": fac.right, "fura_sigma": fac.sigma}
        trains = {"fura_left": spec.train_left, "fura_right": spec.train_right, "fura_sigma": spec.sigma_trainable}
        self.fura_spec[adapter_name] = spec
        for attr, tensor in tensors.items():
            if tensor is None:
                continue
            tensor = tensor.to(dtype).contiguous()
            if not init_weights and trains[attr]:  # the same non-identity test start as the implicit layers
                noise = 0.1 * torch.randn_like(tensor)
                tensor = tensor * (1 + noise) if attr == "fura_sigma" else tensor + noise * tensor.abs().mean()
            getattr(self, attr)[adapter_name] = nn.Parameter(tensor)
        frozen = tuple(attr for attr, tensor in tensors.items() if tensor is not None and not trains[attr])
        if frozen:
            self.frozen_peft_weight_names = {**self.frozen_peft_weight_names, adapter_name: frozen}
        sketch = torch.empty(blocks.FINGERPRINT_SIZE, device=weight.device) if empty else blocks.fingerprint(weight)
        self.fura_fingerprint[adapter_name] = sketch
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # Move the adapter to the base layer's device and keep its dtype (`cast_adapter` sets that).
        base = self.get_base_layer()
        weight = getattr(base, self.weight_name, None)
        target = device if device is not None else (weight.device if weight is not None else None)
        if target is None or target.type == "meta":
            return
        for name in (*self.adapter_layer_names, "fura_basis", "fura_fingerprint"):
            container = getattr(self, name)
            if adapter_name in container and container[adapter_name].device not in (target, torch.device("meta")):
                tensor = container[adapter_name]
                if isinstance(tensor, nn.Parameter):
                    container[adapter_name] = nn.Parameter(tensor.data.to(target), requires_grad=tensor.requires_grad)
                else:
                    container[adapter_name] = tensor.to(target)

    def adapter_dtype(self, autocast: bool) -> torch.dtype:
        """The dtype an adapter lives in: fp32 with ``autocast`` (fp64 on fp64 bases), else the base layer's dtype.

        That is PEFT's ``autocast_adapter_dtype``: a 4-bit base counts as its compute dtype, as in
        `BaseTunerLayer._get_base_layer_device_and_dtype`.
        """
        _, base_dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())
        if base_dtype is None or not base_dtype.is_floating_point:
            return torch.float32
        if autocast:
            return torch.float64 if base_dtype == torch.float64 else torch.float32
        return base_dtype

    def cast_adapter(self, adapter_name: str, dtype: torch.dtype) -> None:
        """Cast one adapter's cores, S and frozen left factor B to ``dtype``, keeping which of them train.

        The sketch of the base weight (`fura_fingerprint`) stays fp32: it is a load-time check, not
        adapter math. Parameters are re-created rather than changed in place, as PEFT's own cast does.
        """
        for name in (*self.adapter_layer_names, "fura_basis"):
            container = getattr(self, name)
            if adapter_name not in container or container[adapter_name].dtype == dtype:
                continue
            tensor = container[adapter_name]
            if isinstance(tensor, nn.Parameter):
                container[adapter_name] = nn.Parameter(tensor.data.to(dtype), requires_grad=tensor.requires_grad)
            else:
                container[adapter_name] = tensor.to(dtype)

    def transform(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The current block transform ``M`` (n, b, b) of an adapter, computed in ``dtype`` (default: the adapter's)."""
        sigma = self.fura_sigma[adapter_name] if adapter_name in self.fura_sigma else None
        left_factor, right = self.fura_basis[adapter_name], self.fura_core[adapter_name]
        if dtype is not None:
            left_factor, right = left_factor.to(dtype), right.to(dtype)
            sigma = None if sigma is None else sigma.to(dtype)
        return blocks.block_transform(left_factor, right, sigma)

    def explicit_weight(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The current ``W(L, S, R)`` (out × in) of an explicit-layout adapter, in ``dtype`` (default: its own)."""
        sigma = self.fura_sigma[adapter_name] if adapter_name in self.fura_sigma else None
        left, right = self.fura_left[adapter_name], self.fura_right[adapter_name]
        if dtype is not None:
            left, right, sigma = left.to(dtype), right.to(dtype), None if sigma is None else sigma.to(dtype)
        return blocks.explicit_weight(left, right, sigma, self.fura_spec[adapter_name].m_blocks)

    def _check_explicit_alone(self, adapter_names: list[str]) -> None:
        """An explicit adapter replaces the whole weight, so no other adapter can act with it on one layer."""
        explicit = [name for name in adapter_names if self.fura_spec[name].explicit]
        if explicit and len(adapter_names) > 1:
            others = [name for name in adapter_names if name != explicit[0]]
            raise ValueError(
                f"FuRA adapter {explicit[0]!r} uses the explicit L·S·R layout, which replaces the whole weight, so it "
                f"cannot be active or merged together with {others} on the same layer; use one adapter at a time"
            )

    def merged_weight(self, weight: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """``weight`` (out × in) with the given adapters applied, in fp32 (fp64 for fp64 bases), in the order given.

        An explicit-layout adapter gives its own ``W(L, S, R)`` whatever ``weight`` is, and must be the only one.
        """
        weight = weight.double() if weight.dtype == torch.float64 else weight.float()
        adapter_names = [name for name in adapter_names if name in self.fura_spec]
        self._check_explicit_alone(adapter_names)
        for name in adapter_names:  # every merge and dense export comes through here: none takes a NaN
            refuse_non_finite(adapter_tensors(self, name), name, "merge")
        for name in adapter_names:
            spec = self.fura_spec[name]
            if spec.explicit:  # computed in the merge's precision, whatever the adapter's dtype
                weight = self.explicit_weight(name, weight.dtype).detach().to(weight)
                continue
            weight = self.apply_transform(weight, spec.mode, self.transform(name, weight.dtype).detach().to(weight))
        return weight

    # ------------------------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into the base weight: ``W ← W·blockdiag(M)`` (or ``blockdiag(M)ᵀ·W``).

        The weight before the first merge is kept by reference, not copied, so `unmerge` restores it
        bit for bit. TRL's vLLM sync merges and unmerges every step, so any drift would build up.
        The merged weight is always computed out of place, which makes ``safe_merge`` only a
        finiteness check.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.fura_spec]
        if not adapter_names:
            return
        self._check_explicit_alone(self.merged_adapters + adapter_names)
        base = self.get_base_layer()
        weight = self.dense_weight()
        merged = self.merged_weight(weight, adapter_names)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs in the merged weights; the adapter(s) {adapter_names} seem broken")
        if self._premerge is None:
            self._premerge = bases.weight_state(base, self.weight_name)
        merged = self._to_base_layout(merged).to(weight.dtype).contiguous()
        if self.quantization_backend is not None:
            self.set_base_weight(merged)
        else:
            getattr(base, self.weight_name).data = merged
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the exact pre-merge base weight (all merged adapters at once, as PEFT does)."""
        if not self.merged:
            logger.warning("Already unmerged. Nothing to do.")
            return
        bases.restore_weight_state(self.get_base_layer(), self._premerge)
        self._premerge = None
        self.merged_adapters = []

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W(R, S) − W0`` for one adapter, as a dense (out × in) tensor in the layer's layout."""
        weight = self.dense_weight()
        delta = self.merged_weight(weight, [adapter_name]) - weight.float()
        return self._to_base_layout(delta)


class FuraLinear(nn.Module, FuraLayer):
    """A FuRA adapter around an `nn.Linear`, a GPT-2 `Conv1D`, or a quantized linear layer (QFuRA)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, spec: LayerSpec, **kwargs: Any) -> None:
        super().__init__()
        FuraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, spec, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)  # set per call by FuraModel's pre-forward hook
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.fura_spec]
        if any(self.fura_spec[name].explicit for name in active):
            return self._explicit_forward(x, active)
        input_side = [name for name in active if self.fura_spec[name].mode == OUTPUT_ONE_BLOCK]
        output_side = [name for name in active if self.fura_spec[name].mode == INPUT_ONE_BLOCK]
        dtype = x.dtype
        # W0·M_a·M_b·x: the adapter merged last acts first on x.
        for name in reversed(input_side):
            x = self._apply_adapter(name, x).to(dtype)
        result = self.base_layer(x, *args, **kwargs)
        if output_side:
            if self.quantization_backend is not None:
                result = self.quantization_backend.maybe_clone_base_result(result)
            bias = self.get_base_layer().bias
            if bias is not None:
                result = result - bias
            for name in output_side:
                result = self._apply_adapter(name, result, transpose=True)
            result = result.to(dtype)
            if bias is not None:
                result = result + bias
        return result

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        """Refuse what a mixed-adapter batch cannot do on this layer, before computing anything."""
        if len(x) != len(adapter_names):
            raise UserError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {len(x)} rows; give one name per row"
            )
        if self.merged:
            raise UserError(
                f"adapter_names cannot be used while adapters {self.merged_adapters} are merged; call unmerge_adapter()"
            )
        explicit = sorted({name for name in adapter_names if name in self.fura_spec and self.fura_spec[name].explicit})
        if explicit:
            raise UserError(explicit_in_mixed_batch_message(explicit))

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each row of the batch through its own adapter (``"__base__"``: none), as PEFT's LoRA does.

        The base layer still runs once on the whole batch. Input-side adapters transform their rows
        of ``x`` before it, output-side adapters their rows of the result after it. Rows whose
        adapter is not on this layer (and ``"__base__"`` rows) see the base layer alone.
        """
        self._check_mixed_batch(x, adapter_names)
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            if name in self.fura_spec:
                rows.setdefault(name, []).append(row)
        index = {name: torch.tensor(picked, device=x.device) for name, picked in rows.items()}
        dtype = x.dtype
        input_side = [name for name in rows if self.fura_spec[name].mode == OUTPUT_ONE_BLOCK]
        output_side = [name for name in rows if self.fura_spec[name].mode == INPUT_ONE_BLOCK]
        if input_side:
            x = x.clone()
            for name in input_side:
                x[index[name]] = self._apply_adapter(name, x[index[name]]).to(dtype)
        result = self.base_layer(x, *args, **kwargs)
        if output_side:
            result = result.clone()
            bias = self.get_base_layer().bias
            for name in output_side:
                part = result[index[name]]
                part = part - bias if bias is not None else part
                part = self._apply_adapter(name, part, transpose=True).to(dtype)
                result[index[name]] = part + bias if bias is not None else part
        return result

    def _apply_adapter(self, name: str, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """One implicit adapter's ``blockdiag(M)`` (or its transpose) on the last dimension of ``x``."""
        right = self.fura_core[name]
        sigma = self.fura_sigma[name] if name in self.fura_sigma else None
        x = self._cast_input_dtype(x, right.dtype)
        return implicit.apply_fura_transform(x, self.fura_basis[name], sigma, right, transpose=transpose)

    def _explicit_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        """``x·W(L, S, R)ᵀ + bias``: the explicit adapter's weight in place of the base weight."""
        self._check_explicit_alone(active)
        weight = self.explicit_weight(active[0])
        bias = self.get_base_layer().bias
        bias = None if bias is None else bias.to(weight.dtype)
        return F.linear(self._cast_input_dtype(x, weight.dtype), weight, bias).to(x.dtype)

    def __repr__(self) -> str:
        return "fura." + super().__repr__()
