"""A tiny sentencepiece BPE tokenizer trained with Llama's settings, so tests see what Llama's tokenizer does.

Llama (and Vicuna, LLaVA-1.5's language model) tokenizes with a sentencepiece BPE model with byte fallback,
digits split one per token and a dummy prefix ("▁") before the text. So ``": 2"`` ends in a lone ``▁`` and a
``2``, and a text chunk that starts with a newline starts with ``▁ <0x0A>``: the effects issue 19 is about, which
a word-level tokenizer cannot show. The model trains in well under a second on a few hundred lines; it is
loaded as transformers' `LlamaTokenizer` from its vocabulary and merges (no protobuf needed), saved, and
reloaded with `AutoTokenizer`, as a real checkpoint's tokenizer is.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

LLAMA_SETTINGS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "normalization_rule_name": "identity",
    "allow_whitespace_only_pieces": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "character_coverage": 1.0,
}


def training_lines(texts: list[str], count: int = 300, seed: int = 0) -> list[str]:
    """``count`` lines of the words of ``texts`` in random order, each with a number (so digits are seen)."""
    rng = random.Random(seed)
    words = sorted({word for text in texts for word in text.split()})
    return [" ".join(rng.choices(words, k=12)) + f" {rng.randint(0, 2024)}" for _ in range(count)]


def save_llama_tokenizer(path: Path, texts: list[str], vocab_size: int = 600):
    """Train the BPE model on ``texts``' words, save it as a Llama tokenizer under ``path`` and reload it from there."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines(texts)),
        model_writer=model,
        vocab_size=vocab_size,
        num_threads=1,
        minloglevel=2,
        **LLAMA_SETTINGS,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
