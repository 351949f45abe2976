"""Configuration of the training data: where text comes from, how it is tokenized and split."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Pre-tokenized sources, recognised by suffix: raw little-endian uint16 tokens (nanoGPT's
# format) or a 1-D integer NumPy array.
PRETOKENIZED_SUFFIXES = (".bin", ".npy")

PARTITIONS = ("iid", "non-iid")

# 256 byte-level symbols plus the <|endoftext|> separator.
MIN_BPE_VOCAB = 257


def is_pretokenized(source: str) -> bool:
    """True when ``source`` names a file of token ids rather than text."""
    return source != "stdlib" and source.lower().endswith(PRETOKENIZED_SUFFIXES)


@dataclass
class DataConfig:
    """Training data. Errors name fields as ``data.<field>``."""

    source: str = "stdlib"
    """"stdlib": the running interpreter's standard-library .py sources (no test suites,
    no site-packages), in sorted path order; or a text file; or a folder of text files
    (*.txt, *.md, *.py, ...); or records: a .jsonl file (one JSON object per line) or a
    .parquet file, one document per record, its text in data.text_field, read as a
    stream up to data.max_bytes (Parquet needs pip install 'farsync[parquet]'); or
    pre-tokenized ids: a .bin file of uint16 tokens or a .npy file holding a 1-D integer
    array."""
    text_field: str = "text"
    """Records (.jsonl, .parquet): the field / column holding each document's text."""
    tokenizer: str = "bpe"
    """"bpe": train a byte-level BPE on the training split (cached by content hash); or a
    path to a Hugging Face tokenizer.json. Ignored for pre-tokenized sources."""
    vocab_size: int = 512
    """BPE vocabulary size (>= 257). With a tokenizer.json the file's own size is used.
    For pre-tokenized sources: must exceed every token id; 0 infers max id + 1."""
    val_fraction: float = 0.05
    """Fraction of files held out for validation (at least one file when > 0), chosen by
    a hash of each file's path. Pre-tokenized sources hold out this fraction of tokens
    from the end."""
    max_bytes: int = 8_000_000
    """Cap on the text used: whole files are taken in sorted order while their sizes sum
    to at most this (the first file is cut if it alone is larger). 0 = no cap. Ignored for
    pre-tokenized sources."""
    partition: str = "iid"
    """How training data is split across workers. "iid": windows of the whole training
    stream dealt to workers by a seeded permutation. "non-iid": each worker gets its own
    contiguous block of files (different packages of the stdlib, say)."""
    cache_dir: str = ".cache/farsync"
    """Where trained tokenizers and token arrays are cached."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its value."""
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"data.source must be 'stdlib' or a path (got {self.source!r})")
        if self.source != "stdlib" and not os.path.exists(self.source):
            raise ValueError(f"data.source: no such file or directory: {self.source!r}")

        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"data.text_field must be a non-empty field name (got {self.text_field!r})")

        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(
                f"data.tokenizer must be 'bpe' or a path to a tokenizer.json (got {self.tokenizer!r})"
            )
        if (
            self.tokenizer != "bpe"
            and not is_pretokenized(self.source)
            and not os.path.isfile(self.tokenizer)
        ):
            raise ValueError(
                f"data.tokenizer must be 'bpe' or a path to a tokenizer.json "
                f"(no such file: {self.tokenizer!r})"
            )

        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool):
            raise ValueError(f"data.vocab_size must be an integer (got {self.vocab_size!r})")
        if is_pretokenized(self.source):
            if self.vocab_size < 0:
                raise ValueError(
                    f"data.vocab_size must be >= 0 for pre-tokenized data, 0 to infer it "
                    f"(got {self.vocab_size})"
                )
        elif self.tokenizer == "bpe" and self.vocab_size < MIN_BPE_VOCAB:
            raise ValueError(
                f"data.vocab_size must be >= {MIN_BPE_VOCAB} (got {self.vocab_size}): byte-level "
                f"BPE needs 256 byte tokens plus <|endoftext|>"
            )

        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)):
            raise ValueError(f"data.val_fraction must be a number (got {self.val_fraction!r})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1) (got {self.val_fraction})")

        if not isinstance(self.max_bytes, int) or isinstance(self.max_bytes, bool) or self.max_bytes < 0:
            raise ValueError(f"data.max_bytes must be an integer >= 0, 0 for no cap (got {self.max_bytes!r})")

        if self.partition not in PARTITIONS:
            raise ValueError(f"data.partition must be 'iid' or 'non-iid' (got {self.partition!r})")

        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise ValueError(f"data.cache_dir must be a non-empty path (got {self.cache_dir!r})")
