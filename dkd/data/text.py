"""Word-level next-word prediction over plain-text files.

Tokens: the text is lower-cased and split into maximal runs of letters and digits (Unicode
``[^\\W_]+``); whitespace, punctuation and underscores only separate words and are dropped
("Don't stop!" -> ["don", "t", "stop"]). Files are read as UTF-8 (undecodable bytes
replaced) and concatenated in the order given (a directory: its ``*.txt`` files by name),
so a context may span a file boundary.

Split by position: the first ``train_fraction`` of the token stream trains, the rest tests.
The vocabulary is built from the training part only: index 0 is ``<unk>``, then the
``vocab_size`` most frequent words, ties broken alphabetically; every other word maps to
``<unk>``. The class set is the vocabulary (``<unk>`` included, and it is a valid target).

Sample i of a split is (tokens[i : i + n] -> tokens[i + n]) with n = ``context``. ``x`` is
returned as float32 token ids (the engine casts inputs to its dtype; ids are exact in fp32
below 2^24, but NOT in bf16 above 256) and the text backbones round them back to integers.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from dkd.data.checks import DatasetError

UNK = "<unk>"
_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def text_files(root: str | Path) -> list[Path]:
    """A file, or a directory's ``*.txt`` files in name order."""
    root = Path(root)
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.glob("*.txt") if p.is_file())
        if files:
            return files
        raise DatasetError(f"text: no *.txt files in {root} (expected a text file, or a "
                           "directory of *.txt files)")
    raise DatasetError(f"text: {root} does not exist (expected a text file, or a directory "
                       "of *.txt files)")


def read_tokens(files: Sequence[Path]) -> list[str]:
    words: list[str] = []
    for f in files:
        toks = tokenize(Path(f).read_text(encoding="utf-8", errors="replace"))
        if not toks:
            raise DatasetError(f"text: {f} is empty (no words: letters or digits)")
        words += toks
    return words


def build_vocab(words: Sequence[str], size: int) -> list[str]:
    """``<unk>`` followed by the ``size`` most frequent words (ties: alphabetical)."""
    counts = Counter(words)
    counts.pop(UNK, None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [UNK] + [w for w, _ in ranked[:size]]


class TextSplit:
    """Next-token samples over a token-id stream (T,): len = T - n."""

    def __init__(self, ids: torch.Tensor, context: int):
        self.ids, self.context = ids.long(), context
        self._offsets = torch.arange(context)

    def __len__(self) -> int:
        return max(0, len(self.ids) - self.context)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) -> x (B, n) float32 token ids, y (B,) long next-token ids."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self.ids[idx[:, None] + self._offsets]
        return x.float(), self.ids[idx + self.context]

    def labels(self) -> torch.Tensor:
        """(len,) every sample's next-token id, in sample order."""
        return self.ids[self.context:]


class TextCorpus:
    """Tokens, vocabulary and the two splits of a set of text files."""

    def __init__(self, root: str | Path, vocab_size: int, context: int,
                 train_fraction: float = 0.9):
        files = text_files(root)
        words = read_tokens(files)
        cut = int(round(train_fraction * len(words)))
        if cut <= context or len(words) - cut <= context:
            raise DatasetError(
                f"text: {len(words)} words in {', '.join(map(str, files[:3]))}"
                f"{' ...' if len(files) > 3 else ''} give {cut} training and {len(words) - cut} "
                f"test words; each part needs more than data.context = {context}")
        self.files, self.context = files, context
        self.itos = build_vocab(words[:cut], vocab_size)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        ids = torch.tensor([self.stoi.get(w, 0) for w in words], dtype=torch.long)
        self.train = TextSplit(ids[:cut], context)
        self.test = TextSplit(ids[cut:], context)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, 0) for w in tokenize(text)]
