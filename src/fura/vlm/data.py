"""LLaVA-1.5 training data: ``llava_v1_5_mix665k.json`` records into input ids, labels and pixel values.

A record is ``{"id", "image": "coco/train2017/….jpg", "conversations": [{"from": "human", "value":
"<image>\\n…"}, {"from": "gpt", "value": "…"}, …]}``; text-only records have no ``image``. As LLaVA-1.5
does (``preprocess_multimodal`` + ``preprocess_v1``):

- ``<image>`` is moved to the front of its turn (``"<image>\\n" + rest``);
- the ``vicuna_v1`` template: ``SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>``;
- the text chunks around ``<image>`` are tokenized separately (LLaVA's ``tokenizer_image_token``): with
  Llama's dummy prefix the image is followed by ``▁ <0x0A>``, not by ``<0x0A>`` alone (`tokenize_around_images`);
- labels on the assistant answers and their ``</s>`` only (found by character offsets), never on image
  tokens. Each answer's span starts at the space before it, as LLaVA's mask does: Llama's tokenizer emits
  a lone ``▁`` before an answer that starts with a digit, and LLaVA trains on it;
- every record's ``<image>`` count is checked when the dataset is built, so a stray ``<image>`` in a
  text-only record stops the run before training, not when the record is reached;
- the one ``<image>`` token is expanded to the model's image-token count *before* truncating to
  ``max_length``, so the limit counts what the model sees (a limit that would cut the image is an error).

Images are read when a record is used (665k images do not fit in memory), padded to a square with
the mean colour by the processor. A missing or unreadable image is an error naming the record and
the path; nothing is trained on a silently dropped image.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from fura.data.commonsense import DataFormatError
from fura.vlm import IMAGE_TOKEN

logger = logging.getLogger(__name__)

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
IGNORE_INDEX = -100


def move_image_to_front(value: str) -> str:
    """LLaVA's placement: drop ``<image>`` wherever it is in the turn and put ``<image>\\n`` before the rest."""
    return IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()


def render(
    conversations: Sequence[dict[str, str]], record_id: Any, eos: str = "</s>"
) -> tuple[str, list[tuple[int, int]]]:
    """The ``vicuna_v1`` text of a conversation and the character spans of its targets (answer + ``</s>``)."""
    turns = list(conversations)
    if turns and turns[0].get("from") != "human":
        turns = turns[1:]  # LLaVA skips a leading non-human turn
    text, spans = SYSTEM + " ", []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataFormatError(f"record {record_id!r}: turn {i} needs 'from' and a string 'value', got {turn!r}")
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise DataFormatError(
                f"record {record_id!r}: turn {i} is from {turn.get('from')!r}, expected {expected!r} "
                "(turns alternate human/gpt)"
            )
        value = move_image_to_front(turn["value"]) if IMAGE_TOKEN in turn["value"] else turn["value"]
        if expected == "human":
            text += f"{ROLES['human']}: {value} "
        else:
            text += f"{ROLES['gpt']}: "
            start = len(text) - 1  # the space: Llama's lone "▁" before a digit answer is a target in LLaVA
            text += value + eos
            spans.append((start, len(text)))
    if not spans:
        raise DataFormatError(f"record {record_id!r}: no assistant ('gpt') turn to learn from")
    return text, spans


def tokenize_around_images(tokenizer, text: str, image_token_id: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and their character offsets, tokenized as LLaVA's ``tokenizer_image_token`` does.

    Each text chunk between ``<image>`` markers is tokenized on its own (only the first gets the BOS), and
    the chunks are joined by one image token each. With Llama's dummy prefix a chunk starts with ``▁``, so
    ``USER: <image>\\n`` becomes ``▁ <image> ▁ <0x0A>``: the input LLaVA-1.5 was trained and evaluated on.
    """
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    position = 0
    for index, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if index:
            ids.append(image_token_id)
            offsets.append((position - len(IMAGE_TOKEN), position))
        encoded = tokenizer(chunk, return_offsets_mapping=True, add_special_tokens=index == 0)
        ids += encoded["input_ids"]
        offsets += [(start + position, end + position) for start, end in encoded["offset_mapping"]]
        position += len(chunk) + len(IMAGE_TOKEN)
    return ids, offsets


def image_count(conversations: Sequence[dict[str, Any]]) -> int:
    """How many ``<image>`` tokens a conversation renders to: one per turn that mentions it (see `render`)."""
    return sum(isinstance(turn, dict) and IMAGE_TOKEN in str(turn.get("value", "")) for turn in conversations)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a mix665k-style JSON (a list) or JSONL file and check each record's shape."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        records = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl"
            else json.loads(text)
        )
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(records, list) or not records:
        raise DataFormatError(f"{path}: expected a non-empty list of records")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise DataFormatError(
                f"{path}: record {i} (id {record.get('id') if isinstance(record, dict) else None!r}) "
                "has no 'conversations' list"
            )
        record.setdefault("id", i)
    return records


def check_image_tokens(records: Sequence[dict[str, Any]]) -> None:
    """Refuse, naming up to five, the records whose ``<image>`` count is not 1 with an image and 0 without."""
    wrong = [
        (record["id"], bool(record.get("image")), count)
        for record in records
        if (count := image_count(record["conversations"])) != int(bool(record.get("image")))
    ]
    if wrong:
        shown = "; ".join(
            f"record {rid!r} has {'an image' if has_image else 'no image'} but {count} {IMAGE_TOKEN} token(s)"
            for rid, has_image, count in wrong[:5]
        )
        raise DataFormatError(
            f"{len(wrong)} record(s) with a wrong {IMAGE_TOKEN} count (LLaVA-1.5 needs exactly 1 with an image, "
            f"0 without): {shown}"
        )


@dataclass
class Example:
    """One tokenized record: ids and labels after image expansion and truncation, and its image path (or None)."""

    input_ids: list[int]
    labels: list[int]
    image: Path | None


class LlavaDataset(torch.utils.data.Dataset):
    """mix665k records as training examples; images are read in `__getitem__` (so loader workers share the work).

    ``image_tokens`` is the model's count per image (``config.image_seq_length``: 576 for LLaVA-1.5).
    ``check_images`` stats every image path up front, so a missing file stops the run before it starts.
    """

    def __init__(
        self,
        records: list[dict[str, Any]],
        tokenizer,
        image_processor,
        image_folder: str | Path,
        image_tokens: int,
        max_length: int = 2048,
        check_images: bool = True,
    ) -> None:
        self.records = records
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_folder = Path(image_folder)
        self.image_tokens = image_tokens
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise DataFormatError(
                f"the tokenizer has no {IMAGE_TOKEN} token: assemble the model with `fura vlm assemble`"
            )
        if max_length <= image_tokens:
            raise DataFormatError(f"max_length {max_length} leaves no room for text after {image_tokens} image tokens")
        check_image_tokens(records)
        if check_images:
            missing = [
                (r["id"], self.image_folder / r["image"])
                for r in records
                if r.get("image") and not (self.image_folder / r["image"]).is_file()
            ]
            if missing:
                shown = "; ".join(f"record {rid!r}: {path}" for rid, path in missing[:5])
                raise DataFormatError(
                    f"{len(missing)} image(s) not found under image folder {self.image_folder}: {shown}"
                )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's cheap length estimate (words), positive for image records and negative for text-only ones."""
        out = []
        for record in self.records:
            words = sum(len(str(turn.get("value", "")).split()) for turn in record["conversations"])
            out.append(words if record.get("image") else -words)
        return out

    def tokenize(self, record: dict[str, Any]) -> Example:
        """Template, tokenize, label, expand the image token and truncate one record."""
        rid = record["id"]
        has_image = bool(record.get("image"))
        text, spans = render(record["conversations"], rid, eos=self.tokenizer.eos_token)
        ids, offsets = tokenize_around_images(self.tokenizer, text, self.image_token_id)
        input_ids, labels = [], []
        for token, (start, end) in zip(ids, offsets, strict=True):
            if token == self.image_token_id:
                input_ids += [token] * self.image_tokens
                labels += [IGNORE_INDEX] * self.image_tokens
                continue
            target = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
            input_ids.append(token)
            labels.append(token if target else IGNORE_INDEX)
        if has_image and input_ids.index(self.image_token_id) + self.image_tokens > self.max_length:
            raise DataFormatError(
                f"record {rid!r}: max_length {self.max_length} would cut its {self.image_tokens} image tokens"
            )
        return Example(
            input_ids[: self.max_length],
            labels[: self.max_length],
            self.image_folder / record["image"] if has_image else None,
        )

    def load_image(self, record_id: Any, path: Path) -> torch.Tensor:
        """Pixel values (3, H, W) of one image; a missing or unreadable file names the record and the path."""
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            raise DataFormatError(f"record {record_id!r}: cannot read image {path}: {err}") from err
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        example = self.tokenize(record)
        item: dict[str, Any] = {"input_ids": example.input_ids, "labels": example.labels}
        if example.image is not None:
            item["pixel_values"] = self.load_image(record["id"], example.image)
        return item


@dataclass
class LlavaCollator:
    """Right-pad ids and labels; stack the pixel values of the records that have an image (text-only ones add none).

    With ``dummy_image`` (the image tokens' id, their count and the pixel shape), a batch without any
    image gets one all-zero image whose tokens sit after the first row's text, masked out of the
    attention and the loss. The vision tower and projector then run on every rank at every step, as
    in LLaVA (which feeds text-only records a zero image): ZeRO-3 gathers parameters module by module,
    and a rank that skipped the projector while another ran it would wait forever (DDP would fail
    on the unused parameters). The dummy changes no real token's output: it comes after them
    (causal attention) and its keys are masked.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = 8
    dummy_image: tuple[int, int, tuple[int, ...]] | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [item["pixel_values"] for item in items if "pixel_values" in item]
        dummy = self.dummy_image if not images else None
        lengths = [len(item["input_ids"]) for item in items]
        longest = max(lengths[0] + dummy[1], *lengths) if dummy else max(lengths)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
            ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if dummy:
            token_id, count, shape = dummy
            ids[0, lengths[0] : lengths[0] + count] = token_id
            images = [torch.zeros(shape)]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """LLaVA's ``group_by_modality_length`` order: batches of image records and of text-only records.

    ``lengths`` is positive for image records and negative for text-only ones. Each modality is
    shuffled and cut into megabatches of ``batch_size × world_size`` records sorted by length, so
    one optimizer micro-step sees one modality on every rank; megabatches are then shuffled. The
    two modalities' leftovers form one last mixed megabatch.
    """
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return _length_grouped([abs(x) for x in lengths], list(range(len(lengths))), batch_size * world_size, generator)
    image = [i for i, length in enumerate(lengths) if length > 0]
    text = [i for i, length in enumerate(lengths) if length < 0]
    megabatch = batch_size * world_size
    groups = []
    leftovers = []
    for indices in (image, text):
        order = _length_grouped([abs(lengths[i]) for i in indices], indices, megabatch, generator)
        full = _chunks(order, megabatch)
        if full and len(full[-1]) < megabatch:
            leftovers += full.pop()
        groups += full
    permutation = torch.randperm(len(groups), generator=generator).tolist()
    result = [i for p in permutation for i in groups[p]]
    return result + sorted(leftovers, key=lambda i: -abs(lengths[i]))


def _length_grouped(lengths: Sequence[int], indices: list[int], megabatch: int, generator) -> list[int]:
    """Shuffle ``indices``, then sort each megabatch by length, longest first."""
    permutation = torch.randperm(len(indices), generator=generator).tolist()
    shuffled = [indices[p] for p in permutation]
    length_of = dict(zip(indices, lengths, strict=True))
    return [i for chunk in _chunks(shuffled, megabatch) for i in sorted(chunk, key=lambda i: -length_of[i])]


class ModalityLengthSampler(torch.utils.data.Sampler[int]):
    """A sampler yielding `modality_length_grouped_indices` (a new shuffle each epoch, seeded)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
