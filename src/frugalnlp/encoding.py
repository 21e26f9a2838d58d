"""Tokenisation of task splits and batching for training and inference."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase

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


def encode_split(split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int) -> EncodedSplit:
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
