"""Tokenizers: train a WordPiece tokenizer on reports, save/load it, encode batches.

A text encoder trained from scratch gets a fast BERT-style WordPiece tokenizer
(lowercasing BERT normalizer, BERT pre-tokenizer, ``[CLS] text [SEP]`` template)
trained on the pre-training split's reports; it is saved next to the weights.
Pretrained Hugging Face models (e.g. MiniLM) bring their own tokenizer, loaded the
same way. :func:`encode_texts` returns the tensors a batch carries, including the
word ids used for whole-word masking.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from medvlp.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _wordpiece_vocab(word_counts: Counter, vocab_size: int, min_frequency: int) -> list[str]:
    """A deterministic WordPiece vocabulary (Hugging Face's trainer breaks ties in
    hash-map order, so two runs on the same reports can give different ids; that would
    break "same seed, same numbers" and exact resume).

    Order: special tokens; every character, as a word start and as a ``##`` continuation
    (so no word maps to [UNK]); whole words seen at least ``min_frequency`` times, most
    frequent first; then word prefixes and ``##`` suffixes ranked by how many characters
    they cover (count x (length - 1)). Ties break alphabetically.
    """
    chars: set[str] = set()
    for word in word_counts:
        chars.update(word[:1])
        chars.update("##" + ch for ch in word[1:])
    vocab = list(SPECIAL_TOKENS) + sorted(chars)
    seen = set(vocab)
    words = sorted((w for w, c in word_counts.items() if c >= min_frequency), key=lambda w: (-word_counts[w], w))
    budget = vocab_size - len(vocab)
    for w in words[: max(budget, 0)]:
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    if len(vocab) < vocab_size:
        pieces: Counter = Counter()
        for word, count in word_counts.items():
            if word in seen:
                continue
            for i in range(2, len(word)):
                pieces[word[:i]] += count * (i - 1)
                pieces["##" + word[i - 1 :]] += count * (len(word) - i)
        ranked = sorted((p for p in pieces if p not in seen), key=lambda p: (-pieces[p], p))
        vocab.extend(ranked[: vocab_size - len(vocab)])
    return vocab


def train_wordpiece(
    texts: Iterable[str], vocab_size: int, *, lowercase: bool = True, min_frequency: int = 2
) -> "PreTrainedTokenizerFast":
    """Train a BERT-style WordPiece tokenizer on ``texts``, deterministically.

    The special tokens take ids 0-4 in the order of :data:`SPECIAL_TOKENS`. Words
    seen fewer than ``min_frequency`` times (or beyond the vocabulary budget) are split
    into the longest known pieces. Every character seen gets a token, so the vocabulary
    can exceed ``vocab_size`` by the size of the alphabet.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ConfigError(f"model.text.vocab_size: must be larger than {len(SPECIAL_TOKENS)}, got {vocab_size}")
    pad, unk, cls, sep, mask = SPECIAL_TOKENS
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        if text:
            counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = _wordpiece_vocab(counts, vocab_size, min_frequency)
    tok = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=unk, continuing_subword_prefix="##"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        unk_token=unk,
        cls_token=cls,
        sep_token=sep,
        mask_token=mask,
        do_lower_case=lowercase,
    )


def save_tokenizer(tokenizer: "PreTrainedTokenizerBase", directory: str | Path) -> None:
    """Write the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) to ``directory``."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> "PreTrainedTokenizerBase":
    """Load a tokenizer saved by :func:`save_tokenizer` or shipped with a local HF model."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(directory)
    if not path.is_dir() or not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise DataError(
            f"no tokenizer in {str(directory)!r} (expected one of {', '.join(_TOKENIZER_FILES)}); "
            "point to a medvlp checkpoint/bundle directory or a local Hugging Face model directory"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"cannot load the tokenizer in {str(directory)!r} ({exc})") from None
        # A bare tokenizer.json without a usable tokenizer_config.json still loads.
        return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))


def encode_texts(tokenizer: "PreTrainedTokenizerBase", texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize a batch: pad to the longest text (at most ``max_length``), truncate.

    Returns long tensors (B, N): ``input_ids``, ``attention_mask`` and ``word_ids``
    (index of the word each token belongs to within its text; -1 for special and
    padding tokens), the grouping used by whole-word masking.
    """
    if max_length < 2:
        raise ConfigError(f"model.text.max_length: must be at least 2 ([CLS] and [SEP]), got {max_length}")
    texts = list(texts)
    if not texts:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone(), "word_ids": empty.clone()}
    enc = tokenizer(
        texts,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_attention_mask=True,
        return_token_type_ids=False,
    )
    word_ids = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(texts))]
    return {
        "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
        "attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.long),
        "word_ids": torch.tensor(word_ids, dtype=torch.long),
    }
