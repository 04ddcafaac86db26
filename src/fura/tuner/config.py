"""`FuraConfig`: the PEFT configuration of FuRA, with the paper's knobs validated eagerly."""

from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, Literal

from peft.config import PeftConfig

from fura.blocks import KEEP_MODES, MERGE_MODES
from fura.errors import UserError
from fura.tuner.adapter_loading import AdapterLoading
from fura.tuner.checks import WEIGHTS_NAME, file_sha256
from fura.tuner.peft_type import FURA_PEFT_TYPE

DECOMP_MODES = ("output_one_block", "input_one_block", "square")
TRAIN_POSITIONS = ("small", "large", "both")
S_MERGED_TO = KEEP_MODES + MERGE_MODES
BIAS_MODES = ("none", "all", "fura_only")
FACTORIZATION_DTYPES = ("auto", "float64", "float32")

# Module groups of the paper's per-group options, recognised from the end of a module's path.
MODULE_GROUPS: dict[str, str] = {
    "qkv": r"(q_proj|k_proj|v_proj|query|key|value|c_attn|qkv_proj|query_key_value|Wqkv)",
    "o": r"(o_proj|out_proj|attention\.output\.dense|attn\.c_proj|dense_out)",
    "mlp_upgate": r"(gate_proj|up_proj|gate_up_proj|c_fc|intermediate\.dense|fc1|w1|w3)",
    "mlp_down": r"(down_proj|mlp\.c_proj|(?<!attention\.)output\.dense|fc2|w2)",
}
GROUP_NAMES = tuple(MODULE_GROUPS)

#: Keys of adapter_config.json that decide which tensors an adapter has and what they mean. A saved
#: config must hold each of them: a missing or misspelt one would silently load with the default.
LAYOUT_KEYS = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "decomp_mode",
    "block_shape",
    "rank",
    "train_position",
    "s_merged_to",
    "bias",
    "modules_to_save",
    "trainable_token_indices",
)

SideShape = Literal["closest", "head", "one"] | tuple[int, int]
# One side's split, or for decomp_mode="square" a pair (output side, input side) such as ((m, a), (n, b)).
BlockShape = SideShape | tuple[SideShape, SideShape]


def both_cores_train_message(s_merged_to: str) -> str:
    """The error for s_merged_to='trainable'/'frozen' when both cores train: neither names one side."""
    return (
        f"s_merged_to={s_merged_to!r} merges S into the core that is {s_merged_to}, but with train_position='both' "
        "both cores train. Use 'keep_trainable', 'keep_frozen', 'split', 'input' (R ← S·Vᵀ) or 'output' (L ← U·S)."
    )


def module_group(module_name: str) -> str | None:
    """The paper's module group (`qkv`, `o`, `mlp_upgate`, `mlp_down`) of a module path, or None."""
    for group, pattern in MODULE_GROUPS.items():
        if re.search(rf"(^|\.){pattern}$", module_name):
            return group
    return None


def _is_side_shape(value: Any) -> bool:
    if isinstance(value, str):
        return value in ("closest", "head", "one")
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def _as_tuple(value: Any) -> Any:
    """JSON gives lists; block shapes are tuples (nested for a square pair)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def is_side_pair(shape: Any) -> bool:
    """True for a square-mode pair (output side, input side) of block shapes, False for a single side."""
    return (
        isinstance(shape, tuple)
        and len(shape) == 2
        and all(_is_side_shape(v) for v in shape)
        and not all(isinstance(v, int) for v in shape)
    )


def _check_block_shape(value: Any, where: str) -> None:
    if _is_side_shape(value) or is_side_pair(_as_tuple(value)):
        return
    raise UserError(
        f"{where}: block shape must be 'closest', 'head', 'one', a pair (n_blocks, block_size) of positive ints, "
        f"or for decomp_mode='square' a pair (output side, input side) of those, got {value!r}"
    )


def _check_per_group(name: str, value: Any, check) -> None:
    if isinstance(value, dict):
        unknown = set(value) - set(GROUP_NAMES) - {"default"}
        if unknown:
            raise UserError(f"{name}: unknown module group(s) {sorted(unknown)}; use {list(GROUP_NAMES)} or 'default'")
        for key, item in value.items():
            check(item, f"{name}[{key!r}]")
    else:
        check(value, name)


def _pick(value: Any, group: str | None, fallback: Any) -> Any:
    if not isinstance(value, dict):
        return value
    if group is not None and group in value:
        return value[group]
    return value.get("default", fallback)


def _document_fields(cls: type) -> type:
    """Put an ``Args:`` section, one entry per field the class declares, from each field's ``help``, in its docstring.

    The help text is the field's documentation (as in peft's configs); this shows it in the class docstring
    too, where PEFT's doc tooling and ``help()`` read it, with no second copy to keep in step. The section
    goes after the summary, before a ``Raises:`` section.
    """
    entries = []
    for item in fields(cls):
        if item.name not in cls.__annotations__:
            continue  # PeftConfig's own fields are documented by peft
        entries.append(f"        {item.name} (`{item.type}`, defaults to `{item.default!r}`):")
        entries += textwrap.wrap(item.metadata["help"], 104, initial_indent=" " * 12, subsequent_indent=" " * 12)
    summary, raises, rest = cls.__doc__.rstrip().partition("\n\n    Raises:")
    cls.__doc__ = f"{summary}\n\n    Args:\n" + "\n".join(entries) + f"{raises}{rest}\n"
    return cls


@_document_fields
@dataclass
class FuraConfig(PeftConfig):
    """Configuration of a FuRA adapter (`FuraModel`): each targeted linear weight is trained as ``W = L·S·R``.

    Every default is the paper's method: each module's input cut into blocks of its closest factor pair,
    full rank, R and S trained, L frozen. Each field's documentation is its ``help`` (listed under Args).

    Raises:
        UserError: On construction, a value outside its choices, or two values that contradict each other
            (``s_merged_to='trainable'`` or ``'frozen'`` with ``train_position='both'``).
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to adapt: a list of names (each matched as a module's path or the end of it), a regex "
            "matched against the whole path, or 'all-linear'. None: the architecture's default targets."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules not to adapt, given in the same forms as target_modules."}
    )
    target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "nn.Parameters to adapt (PEFT's rule: the name or its suffix), e.g. Mixture-of-Experts stacks "
            "'experts.gate_up_proj' and 'experts.down_proj'. Default: every expert stack of the model when "
            "target_modules is the default or 'all-linear'."
        },
    )
    decomp_mode: str | dict[str, str] = field(
        default="output_one_block",
        metadata={
            "help": "Which side of each weight is cut into blocks: 'output_one_block' (the input; the paper's), "
            "'input_one_block' (the output), or 'square' (both: the explicit L·S·R layout). A dict keyed by "
            "module group ('qkv', 'o', 'mlp_upgate', 'mlp_down', 'default') sets it per group."
        },
    )
    rank: str | int | float = field(
        default="full",
        metadata={
            "help": "Rank of each block's SVD: 'full' (lossless), an int (a truncated SVD: lossy), or a float in "
            "(0, 1), a parameter budget: the two cores' size as a fraction of the weight's."
        },
    )
    train_position: str = field(
        default="small",
        metadata={
            "help": "Which core trains: 'small' (the smaller of L and R; the paper's), 'large' or 'both' (W-sized "
            "ablations in the explicit L·S·R layout, chosen per layer). Ties go to the output-side core L."
        },
    )
    s_merged_to: str = field(
        default="keep_trainable",
        metadata={
            "help": "Where the singular values S live: a vector of their own, trained ('keep_trainable') or frozen "
            "('keep_frozen'), or folded into a core at init: 'input' (R ← S·Vᵀ), 'output' (L ← U·S), 'split' "
            "(√S on each side), or the core that trains ('trainable') or is frozen ('frozen')."
        },
    )
    block_shape: str | tuple[int, int] | list[int] | dict[str, Any] = field(
        default="closest",
        metadata={
            "help": "How the split side is cut: 'closest' (its closest factor pair, 4096 → 64×64), 'head' "
            "(num_heads × head_dim), 'one' (a single block: the SVD-reparameterization baseline), or "
            "(n_blocks, block_size); for 'square' a pair (output side, input side) of those, a string "
            "applying to both. A dict keyed by module group sets it per group."
        },
    )
    factorization_dtype: str = field(
        default="auto",
        metadata={
            "help": "Precision of the block SVD at init, whatever the base dtype: 'auto' (fp32, each block whose "
            "conditioning fp32 cannot resolve redone in fp64; fp64 on fp64 bases), 'float64' or 'float32'."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the lossless SVD init. False: a random non-identity init, for tests."},
    )
    bias: str = field(
        default="none",
        metadata={"help": "Which biases train: none ('none'), all ('all'), or the FuRA layers' ('fura_only')."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the FuRA layers that train in full and are saved with the adapter."},
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Token ids whose embedding rows train (as in LoRA); a dict maps embedding module names to ids."
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Indices of the layers to adapt, in the layer list; None: every layer."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the model's layer list (e.g. 'layers', 'h'), used with layers_to_transform."},
    )
    fingerprint_tolerance: float = field(
        default=0.5,
        metadata={
            "help": "Relative distance between the sketch of the base weights saved with an adapter and that of "
            "the base it is loaded on, above which the adapter is refused as made for another checkpoint. A "
            "change of dtype or NF4 quantization stays within it."
        },
    )
    weights_sha256: str | None = field(
        default=None,
        metadata={
            "help": "SHA-256 of adapter_model.safetensors, written by save_pretrained and checked at load. "
            "Not a knob: it is set when the adapter is saved."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = FURA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.block_shape = _as_tuple(self.block_shape)
        self.validate()

    def validate(self) -> None:
        """Reject impossible settings now, with a message naming the fix."""

        def check_mode(value: Any, where: str) -> None:
            if value not in DECOMP_MODES:
                raise UserError(f"{where}: decomp_mode must be one of {DECOMP_MODES}, got {value!r}")

        _check_per_group("decomp_mode", self.decomp_mode, check_mode)
        _check_per_group("block_shape", self.block_shape, _check_block_shape)
        if self.train_position not in TRAIN_POSITIONS:
            raise UserError(f"train_position must be one of {TRAIN_POSITIONS}, got {self.train_position!r}")
        if self.s_merged_to not in S_MERGED_TO:
            raise UserError(f"s_merged_to must be one of {S_MERGED_TO}, got {self.s_merged_to!r}")
        if self.bias not in BIAS_MODES:
            raise UserError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.factorization_dtype not in FACTORIZATION_DTYPES:
            raise UserError(
                f"factorization_dtype must be one of {FACTORIZATION_DTYPES}, got {self.factorization_dtype!r}"
            )
        rank = self.rank
        valid_rank = (
            rank == "full"
            or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1)
            or (isinstance(rank, float) and 0.0 < rank < 1.0)
        )
        if not valid_rank:
            raise UserError(f"rank must be 'full', a positive int, or a float in (0, 1), got {rank!r}")
        if not isinstance(self.init_weights, bool):
            raise UserError(f"init_weights must be True or False, got {self.init_weights!r}")
        tolerance = self.fingerprint_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
            raise UserError(f"fingerprint_tolerance must be a positive number, got {tolerance!r}")
        if self.train_position == "both" and self.s_merged_to in ("trainable", "frozen"):
            raise UserError(both_cores_train_message(self.s_merged_to))

    def layer_options(self, module_name: str) -> tuple[str, BlockShape]:
        """The (decomp_mode, block_shape) that apply to one module, after the group dicts."""
        group = module_group(module_name)
        mode = _pick(self.decomp_mode, group, "output_one_block")
        return mode, _as_tuple(_pick(self.block_shape, group, "closest"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Load the config of a saved adapter; from a local directory this begins a checked load.

        Args:
            pretrained_model_name_or_path (`str`): The adapter's directory, or a Hub repository id.
            subfolder (`str`, *optional*): The folder inside it that holds adapter_config.json.
            kwargs: Passed on to `PeftConfig.from_pretrained`.

        Returns:
            `FuraConfig`: The saved config, carrying the load `PeftModel.from_pretrained`/``load_adapter`` goes on with.

        Raises:
            AdapterLoadError: A local adapter's files are corrupt, truncated, pickle only or lack a layout key,
                or a value is invalid. This runs before PEFT touches the base model, so the model is left as it was.
        """
        path = os.path.join(pretrained_model_name_or_path, subfolder or "")
        read = partial(super().from_pretrained, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not os.path.isdir(path):
            return read()
        return AdapterLoading.begin(path, read, required_keys=LAYOUT_KEYS)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write adapter_config.json with the SHA-256 of the adapter_model.safetensors beside it.

        PEFT writes the weights before the config, so the checksum is of the file just written.
        """
        weights = os.path.join(save_directory, WEIGHTS_NAME)
        self.weights_sha256 = file_sha256(weights) if os.path.isfile(weights) else None
        super().save_pretrained(save_directory, **kwargs)
