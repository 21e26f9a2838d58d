"""Tokenisation of task splits and batching for training and inference."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase

from frugalnlp.errors import FrugalError
from frugalnlp.tasks import Split


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


class EncodedSplit(torch.utils.data.Dataset):
    """Token ids of a split (unpadded lists) and its labels; items are dicts for HF collators."""

    def __init__(self, features: dict[str, list], labels: np.ndarray | None) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.features["input_ids"])

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.features.items()}
        if self.labels is not None:
            item["labels"] = int(self.labels[i])
        return item

    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.features["input_ids"]])


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], pairs: list[str] | None,
                 max_length: int) -> dict[str, list]:
    """Tokenise in one fast batched call; pairs are truncated longest-first to ``max_length``."""
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def encode_fixed_layout(tokenizer: PreTrainedTokenizerBase, texts: list[str], pairs: list[str] | None,
                        length: int, position_offset: int = 0) -> dict[str, list]:
    """Every example padded to ``length`` n with each token at a fixed slot, so that slot i means the same
    thing in every example and attention can be averaged position by position (PAPA).

    Single texts: ``[CLS] text [SEP]`` from slot 0, then padding (a text may use all n slots). Pairs: the
    first text with its special tokens from slot 0 (at most n/2 slots), the second with its own from
    slot n/2 (at most n - n/2). Each text is truncated to its share; the special tokens are kept.
    ``token_type_ids`` and ``position_ids`` follow the tokens: the position of slot i is
    ``position_offset + i`` whatever padding precedes it (RoBERTa-style models count positions from
    ``pad_token_id + 1``). Returns lists of ``length`` ints per example under ``input_ids``,
    ``attention_mask``, ``token_type_ids`` and ``position_ids``.
    """
    if length < 4:
        raise FrugalError(f"--max-length {length} is too short for the fixed layout (at least 4)")
    encoded = tokenizer(texts, pairs, truncation=False, add_special_tokens=True, return_token_type_ids=True,
                        verbose=False)
    pad = tokenizer.pad_token_id
    leading = tokenizer.num_special_tokens_to_add(pair=False)  # specials that close the first text, with the prefix
    half = length // 2 if pairs is not None else length
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "token_type_ids": [], "position_ids": []}
    positions = list(range(position_offset, position_offset + length))
    for i, ids in enumerate(encoded["input_ids"]):
        sequence = encoded.sequence_ids(i)  # None for special tokens, 0 / 1 for the first / second text
        types = encoded["token_type_ids"][i]
        first_text = [j for j, s in enumerate(sequence) if s == 0]
        prefix = first_text[0] if first_text else leading // 2
        first_end = (first_text[-1] + 1 if first_text else prefix) + (leading - prefix)  # past the first text's specials
        segments = [(0, first_end, half)]
        if pairs is not None:
            segments.append((first_end, len(ids), length - half))
        row_ids, row_types = [pad] * length, [0] * length
        row_mask = [0] * length
        start = 0
        for begin, end, room in segments:
            kept = _keep_specials(list(range(begin, end)), sequence, room)
            for slot, j in enumerate(kept, start):
                row_ids[slot], row_types[slot], row_mask[slot] = ids[j], types[j], 1
            start += room
        for name, row in zip(("input_ids", "attention_mask", "token_type_ids", "position_ids"),
                             (row_ids, row_mask, row_types, positions)):
            out[name].append(row)
    return out


def _keep_specials(tokens: list[int], sequence: list[int | None], room: int) -> list[int]:
    """The first ``room`` slots' worth of ``tokens``: text tokens are cut from the end, special ones kept."""
    if len(tokens) <= room:
        return tokens
    special = [j for j in tokens if sequence[j] is None]
    text = [j for j in tokens if sequence[j] is not None][:max(0, room - len(special))]
    head = [j for j in special if not text or j < text[0]]
    return (head + text + [j for j in special if j not in head])[:room]


def encode_split(split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 fixed_layout: bool = False, position_offset: int = 0) -> EncodedSplit:
    """Tokenise a split: truncated to ``max_length`` and unpadded, or padded to exactly ``max_length`` in
    the fixed-position layout of `encode_fixed_layout` when ``fixed_layout``."""
    if fixed_layout:
        return EncodedSplit(encode_fixed_layout(tokenizer, split.texts, split.pairs, max_length, position_offset),
                            split.labels)
    return EncodedSplit(encode_texts(tokenizer, split.texts, split.pairs, max_length), split.labels)


def batches(data: EncodedSplit, tokenizer: PreTrainedTokenizerBase, batch_size: int,
            device: torch.device | str = "cpu") -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Inference batches of similar length (less padding): yields (example indices [b], padded tensors)."""
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    order = np.argsort(data.lengths(), kind="stable")
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = collate([{k: v[i] for k, v in data.features.items()} for i in index])
        yield index, {k: v.to(device) for k, v in batch.items()}


def unsorted_batches(data: EncodedSplit, tokenizer: PreTrainedTokenizerBase,
                     batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches in the data's own order, without labels: what benchmarks time, since real traffic is not
    sorted by length."""
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    batches = [dict(collate([data[i] for i in range(s, min(s + batch_size, len(data)))]))
               for s in range(0, len(data), batch_size)]
    for b in batches:
        b.pop("labels", None)
    return batches
