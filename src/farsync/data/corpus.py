"""Tokenized corpus and the batches each worker trains on.

Batches are a pure function of (worker, workers, step, batch size, sequence length,
seed): no iterator state, so a resumed run draws exactly the batches an uninterrupted run
would, and M simulated workers in one process draw what M real processes would.
"""

from __future__ import annotations

import hashlib
import operator
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from farsync.data.config import DataConfig, is_pretokenized
from farsync.data.sources import RECORD_SUFFIXES, documents_hash, load_documents, split_documents
from farsync.data.tokenizer import EOS_TOKEN, get_tokenizer, tokenizer_hash
from farsync.files import atomic_write

Log = Callable[[str], None]

# Bump when the token-array layout changes, so stale caches are not reused.
TOKENS_FORMAT = "tokens-v1"

# Token ids are held as int32.
MAX_TOKEN_ID = 2**31 - 1
# data.vocab_size = 0 infers max id + 1 up to this (the largest vocabularies in use are
# ~260k): a larger id is far more likely a damaged file than a vocabulary.
MAX_INFERRED_VOCAB = 1 << 21


def _seed(*parts: object) -> int:
    """A 63-bit generator seed from any tuple of values, the same on every platform."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_seed(*parts))
    return g


def _check_int(name: str, value: object, low: int) -> int:
    """value as a Python int (NumPy and 0-d tensor integers accepted), at least ``low``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {low} (got {value!r})") from None
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low} (got {value})")
    return value


def _concat(token_lists: list[list[int]], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One stream with EOS after every document, and each document's [start, end) in it
    (the span includes its trailing EOS, so the spans tile the stream)."""
    lengths = np.array([len(t) + 1 for t in token_lists], dtype=np.int64)
    ends = np.cumsum(lengths)
    stream = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
    for ids, end, length in zip(token_lists, ends, lengths):
        stream[end - length : end - 1] = ids
        stream[end - 1] = eos_id
    spans = np.stack([ends - lengths, ends], axis=1) if len(ends) else np.zeros((0, 2), np.int64)
    return stream, spans


@dataclass(eq=False)
class Corpus:
    """Train and validation token streams, with the tokenizer that made them.

    Build with :meth:`Corpus.build`. ``train_tokens`` is every training document's tokens
    followed by ``eos_id``, concatenated in sorted document order (int32, 1-D);
    ``train_file_spans[i]`` is document ``train_files[i]``'s [start, end) in it, EOS
    included. The same holds for the validation split.
    """

    vocab_size: int
    train_tokens: torch.Tensor = field(repr=False)
    val_tokens: torch.Tensor = field(repr=False)
    train_file_spans: list[tuple[int, int]] = field(repr=False)
    val_file_spans: list[tuple[int, int]] = field(repr=False)
    train_files: list[str] = field(repr=False)
    val_files: list[str] = field(repr=False)
    partition: str = "iid"
    tokenizer: object | None = field(default=None, repr=False)  # tokenizers.Tokenizer
    eos_id: int | None = None
    fingerprint: str = ""  # identifies text, split and tokenizer
    _cache: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, cfg: DataConfig, log: Log = print) -> "Corpus":
        """Read, split and tokenize ``cfg.source``, reusing cached tokenizer and tokens."""
        cfg.validate()
        if is_pretokenized(cfg.source):
            return cls._build_pretokenized(cfg, log)

        t0 = time.perf_counter()
        docs, what = load_documents(cfg.source, cfg.max_bytes, cfg.text_field)
        train, val = split_documents(docs, cfg.val_fraction)
        n_chars = sum(len(d.text) for d in docs)
        unit = "records" if cfg.source.lower().endswith(RECORD_SUFFIXES) else "files"
        log(
            f"data: {len(docs)} {unit}, {n_chars / 1e6:.2f} M characters from {what} "
            f"({len(train)} train / {len(val)} val {unit})"
        )
        text_hash = documents_hash(train, val)
        tok = get_tokenizer(
            cfg.tokenizer, cfg.vocab_size, [d.text for d in train],
            documents_hash(train, []), cfg.cache_dir, log,
        )
        eos_id = tok.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(
                f"data.tokenizer: {cfg.tokenizer!r} has no {EOS_TOKEN} token to separate files"
            )
        tok_hash = tokenizer_hash(tok)
        fingerprint = hashlib.sha256(f"{text_hash}|{tok_hash}".encode()).hexdigest()[:16]

        path = os.path.join(
            cfg.cache_dir, f"{TOKENS_FORMAT}-{text_hash[:16]}-{tok_hash[:16]}.npz"
        )
        if os.path.exists(path):
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            log(f"tokens: loaded from cache {path}")
        else:
            t1 = time.perf_counter()
            arrays = {}
            for split, split_docs in (("train", train), ("val", val)):
                ids = [e.ids for e in tok.encode_batch([d.text for d in split_docs])]
                arrays[split], arrays[split + "_spans"] = _concat(ids, eos_id)

            atomic_write(path, lambda fh: np.savez(fh, **arrays))
            log(f"tokens: tokenized in {time.perf_counter() - t1:.1f} s -> {path}")

        corpus = cls(
            vocab_size=tok.get_vocab_size(),
            train_tokens=torch.from_numpy(arrays["train"].astype(np.int32)),
            val_tokens=torch.from_numpy(arrays["val"].astype(np.int32)),
            train_file_spans=[tuple(map(int, s)) for s in arrays["train_spans"]],
            val_file_spans=[tuple(map(int, s)) for s in arrays["val_spans"]],
            train_files=[d.name for d in train],
            val_files=[d.name for d in val],
            partition=cfg.partition,
            tokenizer=tok,
            eos_id=eos_id,
            fingerprint=fingerprint,
        )
        log(
            f"data: {corpus.train_tokens.numel():,} train / {corpus.val_tokens.numel():,} val "
            f"tokens, vocab {corpus.vocab_size}, fingerprint {fingerprint} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        return corpus

    @classmethod
    def _build_pretokenized(cls, cfg: DataConfig, log: Log) -> "Corpus":
        """A .bin (uint16) or .npy (1-D integer) file of token ids; the last val_fraction
        of the tokens is the validation split. The file is one document, so the non-iid
        partition cuts it into contiguous token ranges."""
        src = cfg.source
        if src.lower().endswith(".bin"):
            arr = np.fromfile(src, dtype=np.uint16)
        else:
            try:  # allow_pickle=False: an object array (a pickle) is refused, never loaded
                arr = np.load(src, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                raise ValueError(f"data.source: {src!r} is not a NumPy .npy array file ({why})") from None
            if not isinstance(arr, np.ndarray) or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                if not isinstance(arr, np.ndarray):
                    raise ValueError(f"data.source: {src!r} is not a NumPy .npy array file (an .npz archive?)")
                raise ValueError(
                    f"data.source: {src!r} must hold a 1-D integer array "
                    f"(got shape {arr.shape}, dtype {arr.dtype})"
                )
        if arr.size == 0:
            raise ValueError(f"data.source: {src!r} contains no tokens")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise ValueError(f"data.source: {src!r} contains negative token ids (min {lo})")
        if hi > MAX_TOKEN_ID:  # ids are held as int32
            raise ValueError(f"data.source: {src!r} holds token id {hi:,} (at index {int(np.argmax(arr)):,}), "
                             f"above the largest farsync takes ({MAX_TOKEN_ID:,}): a damaged file, or not token ids?")
        if not cfg.vocab_size and hi + 1 > MAX_INFERRED_VOCAB:
            raise ValueError(f"data.source: {src!r} holds token id {hi:,} (at index {int(np.argmax(arr)):,}): "
                             f"data.vocab_size = 0 would make a {hi + 1:,}-entry embedding; set data.vocab_size "
                             f"yourself if that is meant, or fix the file (0 infers at most {MAX_INFERRED_VOCAB:,})")
        vocab = cfg.vocab_size or hi + 1
        if hi >= vocab:
            raise ValueError(
                f"data.vocab_size = {cfg.vocab_size} but {src!r} holds token ids up to {hi}; "
                f"set data.vocab_size >= {hi + 1}, or 0 to infer it"
            )
        n_val = int(arr.size * cfg.val_fraction)
        if cfg.val_fraction > 0 and n_val == 0:
            n_val = 1
        n_train = arr.size - n_val
        if n_train < 2:
            raise ValueError(
                f"data.source: {src!r} has {arr.size} tokens; data.val_fraction = "
                f"{cfg.val_fraction} leaves {n_train} for training"
            )
        tokens = torch.from_numpy(np.asarray(arr, dtype=np.int32))
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(arr).view(np.uint8))
        fingerprint = hashlib.sha256(
            f"{h.hexdigest()}|{n_train}|{vocab}".encode()
        ).hexdigest()[:16]
        name = os.path.basename(src)
        log(
            f"data: {n_train:,} train / {n_val:,} val tokens from {src}, vocab {vocab}, "
            f"fingerprint {fingerprint}"
        )
        return cls(
            vocab_size=vocab,
            train_tokens=tokens[:n_train],
            val_tokens=tokens[n_train:],
            train_file_spans=[(0, n_train)],
            val_file_spans=[(0, n_val)] if n_val else [],
            train_files=[f"{name}[:{n_train}]"],
            val_files=[f"{name}[{n_train}:]"] if n_val else [],
            partition=cfg.partition,
            fingerprint=fingerprint,
        )

    # ------------------------------------------------------------------ batches

    def _memo(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Small LRU cache: a value depends only on its key, so caching changes no result."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = make()
        self._cache[key] = value
        if len(self._cache) > 64:
            self._cache.popitem(last=False)
        return value

    def _noniid_ranges(self, workers: int) -> list[tuple[int, int]]:
        """Token range [start, end) of each worker: contiguous blocks of whole files with
        about equal token counts. A single-document corpus is cut into equal ranges."""
        n = self.train_tokens.numel()
        if len(self.train_file_spans) == 1:
            cuts = [n * m // workers for m in range(workers + 1)]
        else:
            if len(self.train_file_spans) < workers:
                raise ValueError(
                    f"data.partition = 'non-iid' gives each worker whole files, but there are "
                    f"{len(self.train_file_spans)} training files for {workers} workers; "
                    f"raise data.max_bytes or use data.partition = 'iid'"
                )
            ends = np.array([e for _, e in self.train_file_spans], dtype=np.int64)
            cuts, last = [0], -1  # last: index of the last file given out so far
            for m in range(1, workers):
                # Cut after the first file that reaches the m-th equal share, but give
                # each worker at least one file and leave one for each worker to come.
                i = int(np.searchsorted(ends, n * m // workers))
                last = min(max(i, last + 1), len(ends) - 1 - (workers - m))
                cuts.append(int(ends[last]))
            cuts.append(n)
        return list(zip(cuts[:-1], cuts[1:]))

    def _shard(self, worker: int, workers: int, seq_len: int, seed: int) -> torch.Tensor:
        """Start offsets (int64) of the windows of seq_len + 1 tokens that this worker owns."""
        w = seq_len + 1
        n_tokens = self.train_tokens.numel()
        if self.partition == "iid":
            n_windows = n_tokens // w
            if n_windows < workers:
                raise ValueError(
                    f"the training split has {n_tokens} tokens = {n_windows} windows of "
                    f"seq_len + 1 = {w}, fewer than workers = {workers}; lower the "
                    f"sequence length or use more data (data.max_bytes)"
                )
            # Deal the windows of the whole stream to workers through one fixed seeded
            # permutation: shards are disjoint and each is a uniform sample of the stream.
            perm = self._memo(
                ("deal", n_windows, seed),
                lambda: torch.randperm(n_windows, generator=_generator("deal", seed, n_windows)),
            )
            return perm[worker::workers] * w
        start, end = self._noniid_ranges(workers)[worker]
        n_windows = (end - start) // w
        if n_windows < 1:
            raise ValueError(
                f"worker {worker} of {workers} has {end - start} training tokens "
                f"(non-iid), fewer than seq_len + 1 = {w}; lower the sequence length or "
                f"use more data (data.max_bytes)"
            )
        return start + torch.arange(n_windows, dtype=torch.int64) * w

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor, seq_len: int):
        idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T+1)
        win = tokens[idx].long()  # (B, T+1)
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()  # x, y: (B, T) each

    def worker_batch(
        self, worker: int, workers: int, step: int, batch_size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and targets y, each (batch_size, seq_len) int64, for one worker's step.

        A pure function of its arguments. Each worker owns a disjoint shard of windows
        (``partition``, see DataConfig) and walks through it in epochs: epoch e visits
        every window of the shard once, in an order drawn from a generator seeded by
        (seed, worker, e); step s takes positions s*B ... s*B + B - 1 of that walk.
        y is x shifted left by one token.
        """
        workers = _check_int("workers", workers, 1)
        step = _check_int("step", step, 0)
        batch_size = _check_int("batch_size", batch_size, 1)
        seq_len = _check_int("seq_len", seq_len, 1)
        worker = _check_int("worker", worker, 0)
        if worker >= workers:
            raise ValueError(f"worker must be in [0, {workers}) (got {worker})")

        shard = self._memo(
            ("shard", self.partition, worker, workers, seq_len, seed),
            lambda: self._shard(worker, workers, seq_len, seed),
        )
        n = shard.numel()
        pos = step * batch_size + torch.arange(batch_size, dtype=torch.int64)
        epochs, within = pos // n, pos % n
        starts = torch.empty(batch_size, dtype=torch.int64)
        for e in epochs.unique().tolist():
            order = self._memo(
                ("order", self.partition, worker, workers, seq_len, seed, e),
                lambda: torch.randperm(n, generator=_generator("order", seed, worker, e)),
            )
            sel = epochs == e
            starts[sel] = shard[order[within[sel]]]
        return self._windows(self.train_tokens, starts, seq_len)

    def eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Validation batches (x, y), each (batch_size, seq_len) int64: the same for every
        method, worker count and seed.

        The validation stream is cut into windows of seq_len + 1 tokens, and up to
        max_batches * batch_size of them, evenly spread over the stream (so every
        validation file is represented), are taken in order. If there are fewer windows
        than batch_size, one smaller batch holds them all.
        """
        batch_size = _check_int("batch_size", batch_size, 1)
        seq_len = _check_int("seq_len", seq_len, 1)
        max_batches = _check_int("max_batches", max_batches, 1)
        w = seq_len + 1
        n_windows = self.val_tokens.numel() // w
        if n_windows == 0:
            raise ValueError(
                f"the validation split has {self.val_tokens.numel()} tokens, fewer than "
                f"seq_len + 1 = {w}; raise data.val_fraction or lower the sequence length"
            )
        count = min(max_batches * batch_size, n_windows)
        if count >= batch_size:
            count -= count % batch_size  # whole batches only
        starts = torch.arange(count, dtype=torch.int64) * n_windows // count * w
        return [
            self._windows(self.val_tokens, chunk, seq_len)
            for chunk in starts.split(batch_size)
        ]

    # ------------------------------------------------------------------ helpers

    def decode(self, ids) -> str:
        """Text for a sequence of token ids (needs a tokenizer: text sources only)."""
        if self.tokenizer is None:
            raise ValueError("this corpus was built from pre-tokenized ids and has no tokenizer")
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        """Token ids for text (needs a tokenizer: text sources only)."""
        if self.tokenizer is None:
            raise ValueError("this corpus was built from pre-tokenized ids and has no tokenizer")
        return self.tokenizer.encode(text).ids
