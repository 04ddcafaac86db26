"""Training with FuRA: transformers Trainer, TRL's SFTTrainer, gradient checkpointing and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model

from conftest import DECODER_TARGETS, char_tokenizer, cpu_sft_config, tiny_llama
from fura import FuraConfig

TEXTS = [f"{a} plus {b} is {a + b}." for a in range(12) for b in range(4)]


def _lm_dataset(tokenizer, max_length: int = 24) -> Dataset:
    encoded = tokenizer(TEXTS, padding="max_length", max_length=max_length, truncation=True)
    encoded["labels"] = [
        [tok if mask else -100 for tok, mask in zip(ids, attn)]
        for ids, attn in zip(encoded["input_ids"], encoded["attention_mask"])
    ]
    return Dataset.from_dict(dict(encoded))


def _loss_drop(log_history: list[dict]) -> tuple[float, float]:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    assert len(losses) >= 4
    return sum(losses[:2]) / 2, sum(losses[-2:]) / 2


def test_trainer_lowers_the_loss_and_trains_only_r_and_s(tmp_path):
    from transformers import Trainer, TrainingArguments

    tokenizer = char_tokenizer()
    model = get_peft_model(tiny_llama(), FuraConfig(target_modules=DECODER_TARGETS))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=20,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        logging_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        adam_beta1=0.9,
        adam_beta2=0.95,
        lr_scheduler_type="linear",
        warmup_steps=0.03,  # a float is a ratio in transformers 5
    )
    trainer = Trainer(model=model, args=args, train_dataset=_lm_dataset(tokenizer))
    trainer.train()
    first, last = _loss_drop(trainer.state.log_history)
    assert last < first - 0.25, f"loss did not drop: {first:.3f} → {last:.3f}"  # measured: 4.56 → 4.00
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fura_core." in n or ".fura_sigma." in n for n in trainable)
    for name, value in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], value), f"frozen {name} changed"


def test_sft_trainer_with_fura_peft_config(tmp_path):
    from trl import SFTTrainer

    tokenizer = char_tokenizer()
    config = cpu_sft_config(tmp_path, max_steps=20)
    trainer = SFTTrainer(
        model=tiny_llama(),
        args=config,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer,
        peft_config=FuraConfig(target_modules=DECODER_TARGETS),
    )
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.peft_config["default"].peft_type == "FURA"
    trainer.train()
    first, last = _loss_drop(trainer.state.log_history)
    assert last < first - 0.25, f"loss did not drop: {first:.3f} → {last:.3f}"  # measured: 4.45 → 3.94


def _grads(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(token_ids):
    plain = get_peft_model(tiny_llama(), FuraConfig())
    checkpointed = get_peft_model(tiny_llama(), FuraConfig())
    checkpointed.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed.base_model.model.enable_input_require_grads()
    plain.train()
    checkpointed.train()
    expected, got = _grads(plain, token_ids), _grads(checkpointed, token_ids)
    assert expected.keys() == got.keys() and expected
    assert all(".fura_core." in n or ".fura_sigma." in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_bf16_autocast_trains(base_dtype, token_ids):
    model = get_peft_model(tiny_llama(dtype=base_dtype), FuraConfig())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(token_ids, labels=token_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
