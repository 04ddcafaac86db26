"""The quickstart's word-level tokenizer and the pre-training of its small Llama model on the world corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)

from fura.experiments.console import progress_callback, quiet_trainer
from fura.experiments.quickstart.settings import QuickstartSettings
from fura.experiments.quickstart.world import World, pretraining_corpus

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def build_tokenizer(texts: list[str], path: Path):
    """A lower-casing word-level tokenizer over every word of ``texts``, saved to ``path`` and reloaded from it."""
    normalizer = normalizers.Lowercase()
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t))})
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizer
    core.pre_tokenizer = pre
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def pretrain(settings: QuickstartSettings, world: World, all_texts: list[str], path: Path, advance) -> None:
    """Build the small Llama model and pre-train it on the world corpus with `Trainer`; save model + tokenizer."""
    from datasets import Dataset  # optional (fura[train])

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n_docs = settings.pretrain_steps * settings.pretrain_batch * settings.pretrain_block // 12  # ~12 tokens a doc
    docs = pretraining_corpus(world, n_docs, settings.world_seed)
    tokenizer = build_tokenizer(all_texts + docs, tmp)
    set_seed(settings.world_seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)

    def pack(batch: dict[str, list]) -> dict[str, list]:
        """Concatenate documents (each ending in EOS) and cut blocks of ``pretrain_block`` tokens: no padding."""
        ids = [t for text in batch["text"] for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
        size = settings.pretrain_block
        return {"input_ids": [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]}

    dataset = Dataset.from_dict({"text": docs}).map(pack, batched=True, remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(tmp / "trainer"),
        max_steps=settings.pretrain_steps,
        per_device_train_batch_size=settings.pretrain_batch,
        learning_rate=settings.pretrain_lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        adam_beta2=0.95,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=settings.world_seed,
        use_cpu=not torch.cuda.is_available(),
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[progress_callback(advance)],
    )
    quiet_trainer(trainer)
    trainer.train()
    model.save_pretrained(tmp)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
