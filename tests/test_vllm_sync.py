"""The weights a GRPO run pushes to vLLM, checked on CPU without vLLM.

FuRA over a dense base goes through TRL's own sync (merge → collect → unmerge); QFuRA goes through
`fura.vllm_sync` (dense ``W0·M`` per layer, nothing merged into the 4-bit base). Either way the
(name, tensor) pairs must be the merged dense model's parameters. The trainer-level tests run
TRL's real `sync_weights` with a stand-in for the vLLM engine / server client.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from trl.distributed import DistributedBackend
from trl.generation import vllm_generation
from trl.generation.vllm_generation import VLLMGeneration

import math_tiny
from fura import FuraConfig, methods, quant
from fura.recipes.grpo import FuraGRPOTrainer
from fura.rewards import boxed_accuracy_reward
from fura.vllm_sync import DenseSyncVLLMGeneration, dense_named_weights, needs_dense_sync, vllm_name


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move R and S away from their identity init, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "fura_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _fura_model():
    model = methods.build(math_tiny.model(len(math_tiny.SPECIALS + math_tiny.WORDS), seed=3), "fura")
    _perturb(model)
    return model


def _qfura_model():
    base = quant.quantize_linear_layers_4bit(
        math_tiny.model(len(math_tiny.SPECIALS + math_tiny.WORDS), seed=3), torch.float32
    )
    model = methods.build(base, "qfura")
    _perturb(model)
    return model


def _int8_fura_model():
    model = methods.build(
        quant.quantize_linear_layers_8bit(math_tiny.model(len(math_tiny.SPECIALS + math_tiny.WORDS), seed=3)), "fura"
    )
    _perturb(model)
    return model


def _merged_params(model) -> dict[str, torch.Tensor]:
    """The reference: a dense model with the adapters merged (a 4-bit base dequantized first), by name."""
    merged = quant.merge_dequantized(model) if quant.is_quantized(model) else copy.deepcopy(model).merge_and_unload()
    return {name: param.detach() for name, param in merged.named_parameters()}


def _trl_sync_pairs(model) -> list[tuple[str, torch.Tensor]]:
    """What TRL's VLLMGeneration yields for ``model``, on one process without vLLM."""
    generation = object.__new__(VLLMGeneration)
    generation.model = model
    generation._dist = DistributedBackend(_NoAccelerator())
    return [(name, tensor.clone()) for name, tensor in generation._iter_named_params()]


class _NoAccelerator:
    state = type("State", (), {"deepspeed_plugin": None, "fsdp_plugin": None})()
    num_processes = 1
    is_main_process = True
    device = torch.device("cpu")


def _assert_pairs_match(pairs, expected: dict[str, torch.Tensor], exact: bool) -> None:
    assert [name for name, _ in pairs] == list(expected)
    for name, tensor in pairs:
        assert tensor.dtype == expected[name].dtype, name
        if exact:
            assert torch.equal(tensor, expected[name]), name
        else:
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_vllm_name_follows_trl():
    assert vllm_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "fura_") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert vllm_name("base_model.model.model.layers.0.self_attn.q_proj.fura_core.default", "fura_") is None
    assert vllm_name("base_model.model.lm_head.modules_to_save.default.weight", "fura_") == "lm_head.weight"
    assert vllm_name("base_model.model.lm_head.original_module.weight", "fura_") is None


def test_fura_trl_merge_sync_pushes_the_merged_model_and_restores_the_base():
    model = _fura_model()
    base_before = {name: param.detach().clone() for name, param in model.named_parameters()}
    expected = _merged_params(model)

    pairs = _trl_sync_pairs(model)

    _assert_pairs_match(pairs, expected, exact=True)
    changed = [name for name, _ in pairs if not torch.equal(expected[name], base_before[_peft_name(model, name)])]
    assert any("q_proj" in name for name in changed)  # the adapter is really in the pushed weights
    for name, param in model.named_parameters():  # merge → unmerge left every tensor bit for bit
        assert torch.equal(param, base_before[name]), name
    assert not any(getattr(module, "merged", False) for module in model.modules())


def _peft_name(model, vllm: str) -> str:
    names = {vllm_name(name, model.prefix): name for name, _ in model.named_parameters()}
    return names[vllm]


def test_dense_sync_equals_merge_sync_for_fura():
    model = _fura_model()
    expected = dict(_trl_sync_pairs(model))
    pairs = list(dense_named_weights(model))
    assert [name for name, _ in pairs] == list(expected)
    for name, tensor in pairs:
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert not needs_dense_sync(model)  # the trainer keeps TRL's own sync here


# int8 compares in training mode: in eval mode bitsandbytes' int8 matmul also quantizes the activations.
@pytest.mark.parametrize(("build", "mode"), [(_qfura_model, "eval"), (_int8_fura_model, "train")])
def test_quantized_dense_sync_pushes_dequantized_w0m_without_merging(build, mode):
    model = build()
    assert needs_dense_sync(model)
    packed_before = {name: param.detach().clone() for name, param in model.named_parameters()}

    pairs = list(dense_named_weights(model))

    _assert_pairs_match(pairs, _merged_params(model), exact=False)
    assert all(tensor.dtype == torch.float32 for _, tensor in pairs)  # dense, not packed uint8
    for name, param in model.named_parameters():  # the 4-bit base was never touched
        assert torch.equal(param, packed_before[name]), name
    assert not any(getattr(module, "merged", False) for module in model.modules())

    # The pushed state is a complete dense model that computes what the QFuRA policy computes.
    dense = math_tiny.model(len(math_tiny.SPECIALS + math_tiny.WORDS), seed=99)
    dense.load_state_dict(dict(pairs), strict=True)
    ids = torch.tensor([[4, 5, 14, 9, 15, 7]])
    getattr(model, mode)()
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ through GRPOTrainer
class _FakeLLM:
    """Stands in for vllm.LLM: records how the engine was started and every weight pushed to it."""

    instances: ClassVar[list] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.loaded: list[tuple[str, torch.Tensor]] = []
        model = type("Model", (), {"load_weights": lambda _, weights: self.loaded.extend(weights)})()
        runner = type("Runner", (), {"model": model})()
        worker = type("Worker", (), {"model_runner": runner})()
        executor = type("Executor", (), {"driver_worker": worker})()
        self.llm_engine = type("Engine", (), {"model_executor": executor})()
        _FakeLLM.instances.append(self)

    def reset_prefix_cache(self):
        pass


class _FakeClient:
    """Stands in for TRL's VLLMClient of server mode: records the streamed (name, tensor) pairs."""

    def __init__(self, **kwargs):
        self.metadata = None
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def init_communicator(self, device):
        pass

    def get_server_info(self):
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def update_named_params(self, metadata, params):
        self.metadata = metadata
        self.loaded.extend((name, tensor.clone()) for name, tensor in params)

    def reset_prefix_cache(self):
        pass


@pytest.fixture
def fake_vllm(monkeypatch):
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda: True)
    monkeypatch.setattr(vllm_generation, "LLM", _FakeLLM, raising=False)
    monkeypatch.setattr(vllm_generation, "VLLMClient", _FakeClient)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost"}.items():
        monkeypatch.setenv(key, value)  # colocate mode writes these; monkeypatch restores them
    monkeypatch.setenv("MASTER_PORT", "29517")
    _FakeLLM.instances.clear()


def _trainer(cls, model, mode: str, tmp_path):
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_vllm=True,
        vllm_mode=mode,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
    )
    data = Dataset.from_dict({"prompt": ["copy 3", "copy 4"], "answer": ["3", "4"]})
    return cls(model, boxed_accuracy_reward, args, train_dataset=data, processing_class=math_tiny.tokenizer())


@pytest.mark.parametrize("mode", ["colocate", "server"])
@pytest.mark.parametrize("method", ["fura", "qfura"])
def test_grpo_trainer_pushes_the_merged_model(fake_vllm, tmp_path, mode, method):
    model = _qfura_model() if method == "qfura" else _fura_model()
    expected = _merged_params(model)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}

    trainer = _trainer(FuraGRPOTrainer, model, mode, tmp_path)
    backend = trainer.vllm_generation
    backend.sync_weights()

    assert type(backend) is (DenseSyncVLLMGeneration if method == "qfura" else VLLMGeneration)
    if mode == "colocate":
        engine = _FakeLLM.instances[-1]
        assert engine.kwargs["quantization"] is None  # a dense engine, also for a 4-bit policy
        pushed = engine.loaded
    else:
        pushed = backend.vllm_client.loaded
        assert [entry[0] for entry in backend.vllm_client.metadata] == list(expected)
    _assert_pairs_match(pushed, expected, exact=method == "fura")
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_plain_trl_would_start_a_4bit_engine_for_qfura(fake_vllm, tmp_path):
    """Why QFuRA needs its own backend: TRL alone starts a bitsandbytes engine, which cannot take dense weights."""
    _trainer(GRPOTrainer, _qfura_model(), "colocate", tmp_path)
    assert _FakeLLM.instances[-1].kwargs["quantization"] == "bitsandbytes"


def test_peft_config_path_picks_the_dense_backend_too(fake_vllm, tmp_path):
    """A 4-bit base plus a FuraConfig (TRL wraps it) gets the same QFuRA backend as a ready PeftModel."""
    base = quant.quantize_linear_layers_4bit(math_tiny.model(len(math_tiny.SPECIALS + math_tiny.WORDS)), torch.float32)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_vllm=True,
        per_device_train_batch_size=4,
        num_generations=4,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
    )
    data = Dataset.from_dict({"prompt": ["copy 3"], "answer": ["3"]})
    trainer = FuraGRPOTrainer(
        base,
        boxed_accuracy_reward,
        args,
        train_dataset=data,
        processing_class=math_tiny.tokenizer(),
        peft_config=FuraConfig(target_modules=["q_proj", "v_proj"]),
    )
    assert type(trainer.vllm_generation) is DenseSyncVLLMGeneration
    assert _FakeLLM.instances[-1].kwargs["quantization"] is None
