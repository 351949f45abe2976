"""Byte-level BPE tokenizer, trained locally with Hugging Face ``tokenizers`` and cached.

Byte-level means every string is representable (no unknown tokens) with 256 base
symbols; BPE merges are learned from the training split only, so nothing about the
validation files leaks into the vocabulary.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable, Iterable

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from farsync.files import atomic_write

EOS_TOKEN = "<|endoftext|>"

# Bump when the training recipe below changes, so stale cached tokenizers are not reused.
BPE_RECIPE = "bytelevel-bpe-v1"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries; ``<|endoftext|>`` gets id 0."""
    tok = Tokenizer(models.BPE())
    # GPT-2's pre-tokenizer: split on a regex (words, numbers, punctuation, whitespace
    # runs), then map bytes to printable symbols. No prefix space: we tokenize whole files.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # All 256 byte symbols from the start, even those absent from the training text,
        # so any input can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's serialised form: equal hashes, equal tokenization."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def get_tokenizer(
    spec: str,
    vocab_size: int,
    train_texts: list[str],
    train_hash: str,
    cache_dir: str,
    log: Callable[[str], None] = print,
) -> Tokenizer:
    """Load ``spec`` (a tokenizer.json path) or, for ``spec == "bpe"``, a cached or newly
    trained BPE. The cache key covers the training text's hash, the vocabulary size, the
    recipe and the ``tokenizers`` version."""
    if spec != "bpe":
        tok = Tokenizer.from_file(spec)
        log(f"tokenizer: {spec} (vocab {tok.get_vocab_size()})")
        return tok

    key = hashlib.sha256(
        f"{BPE_RECIPE}|{tokenizers.__version__}|{vocab_size}|{train_hash}".encode()
    ).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tokenizer-{key}.json")
    if os.path.exists(path):
        tok = Tokenizer.from_file(path)
        log(f"tokenizer: loaded from cache {path} (vocab {tok.get_vocab_size()})")
        return tok

    t0 = time.perf_counter()
    n_bytes = sum(len(t) for t in train_texts)
    tok = train_bpe(train_texts, vocab_size)
    atomic_write(path, lambda fh: fh.write(tok.to_str().encode("utf-8")))
    log(
        f"tokenizer: trained byte-level BPE, vocab {tok.get_vocab_size()}, on "
        f"{n_bytes / 1e6:.1f} M characters in {time.perf_counter() - t0:.1f} s -> {path}"
    )
    return tok
