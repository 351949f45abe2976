"""Data: sources, split by file, tokenizer and token caches, per-worker batches."""

import random

import numpy as np
import pytest
import torch

from farsync.data import Corpus, DataConfig, load_documents, split_documents
from farsync.data.sources import STDLIB_SKIP_DIRS

# Enough distinct words that, once BPE has merged them, no 17-token window repeats.
WORDS = ("def class return import self value index token worker shard sync fragment outer "
         "inner step batch model loss grad mean alpha beta gamma delta codec bytes link "
         "round epoch window stream split train valid cache merge vocab seed rank").split()


def write_corpus(root, n_files=24, words_per_file=400, seed=0):
    """A folder of synthetic text files in nested directories, plus files to ignore."""
    rnd = random.Random(seed)
    for i in range(n_files):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        lines = [" ".join(rnd.choice(WORDS) for _ in range(8)) for _ in range(words_per_file // 8)]
        (sub / f"f{i:02d}.{'py' if i % 2 else 'txt'}").write_text(f"# file {i}\n" + "\n".join(lines) + "\n")
    (root / "image.png").write_bytes(b"\x89PNG not text")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("never read")
    return root


def build(source, tmp_path, log=None, **kw):
    kw.setdefault("vocab_size", 512)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    messages = []
    corpus = Corpus.build(DataConfig(source=str(source), **kw), log=log or messages.append)
    return corpus, messages


@pytest.fixture
def folder(tmp_path):
    return write_corpus(tmp_path / "text")


@pytest.fixture
def corpus(folder, tmp_path):
    return build(folder, tmp_path, val_fraction=0.2)[0]


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize("kwargs,message", [
    (dict(vocab_size=10), "data.vocab_size must be >= 257 (got 10)"),
    (dict(partition="foo"), "data.partition must be 'iid' or 'non-iid' (got 'foo')"),
    (dict(val_fraction=1.5), "data.val_fraction must be in [0, 1) (got 1.5)"),
    (dict(max_bytes=-1), "data.max_bytes must be an integer >= 0"),
    (dict(source="/no/such/dir"), "data.source: no such file or directory: '/no/such/dir'"),
    (dict(tokenizer="/no/tok.json"), "no such file: '/no/tok.json'"),
    (dict(cache_dir=""), "data.cache_dir must be a non-empty path"),
])
def test_bad_config_messages_name_field_and_value(kwargs, message):
    with pytest.raises(ValueError) as e:
        DataConfig(**kwargs)
    assert message in str(e.value)


def test_empty_folder_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.bin.gz").write_bytes(b"xx")
    with pytest.raises(ValueError, match="data.source: '.*empty' contains no text files"):
        build(tmp_path / "empty", tmp_path)


# ---------------------------------------------------------------- text sources and split

def test_folder_files_sorted_and_split_by_file(folder, tmp_path):
    docs, _ = load_documents(str(folder), max_bytes=0)
    names = [d.name for d in docs]
    assert names == sorted(names) and len(names) == 24
    assert not any("secret" in n or n.endswith(".png") for n in names)
    corpus, _ = build(folder, tmp_path, val_fraction=0.2)
    assert len(corpus.val_files) == round(0.2 * 24)
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert sorted(corpus.train_files + corpus.val_files) == names
    assert corpus.train_files == sorted(corpus.train_files)  # sorted order kept for non-iid
    # Spans tile the stream, one per file, each ending in EOS.
    spans = corpus.train_file_spans
    assert len(spans) == len(corpus.train_files) and spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == corpus.train_tokens.numel()
    assert all(corpus.train_tokens[e - 1] == corpus.eos_id for _, e in spans)
    # A file's tokens decode back to its text.
    s, e = spans[0]
    text = (folder / corpus.train_files[0]).read_text()
    assert corpus.decode(corpus.train_tokens[s:e - 1]) == text


def test_split_is_deterministic_and_stable_when_files_are_added(folder):
    docs, _ = load_documents(str(folder), 0)
    _, val = split_documents(docs, 0.2)
    _, val_again = split_documents(list(docs), 0.2)
    assert [d.name for d in val] == [d.name for d in val_again]
    with pytest.raises(ValueError, match="data.val_fraction"):
        split_documents(docs[:1], 0.5)


def test_max_bytes_takes_a_prefix_of_whole_files(folder):
    all_docs, _ = load_documents(str(folder), 0)
    cap = sum(len(d.text.encode()) for d in all_docs[:5]) + 10
    docs, _ = load_documents(str(folder), cap)
    assert [d.name for d in docs] == [d.name for d in all_docs[:5]]


def test_single_text_file_is_cut_into_pieces(folder, tmp_path):
    big = tmp_path / "one.txt"
    big.write_text("".join(p.read_text() for p in sorted(folder.rglob("f*.*"))))
    corpus, _ = build(big, tmp_path, val_fraction=0.1)
    names = corpus.train_files + corpus.val_files
    assert len(names) > 20 and all(n.startswith("one.txt#") for n in names)
    assert corpus.val_files and not set(corpus.train_files) & set(corpus.val_files)


def test_stdlib_corpus(tmp_path):
    corpus, messages = build("stdlib", tmp_path, vocab_size=512, max_bytes=300_000)
    names = corpus.train_files + corpus.val_files
    assert all(n.endswith(".py") for n in names)
    assert not any(part in STDLIB_SKIP_DIRS for n in names for part in n.split("/")[:-1])
    assert corpus.train_files == sorted(corpus.train_files)
    assert corpus.vocab_size == 512 and corpus.val_tokens.numel() > 0
    assert corpus.tokenizer.token_to_id("<|endoftext|>") == corpus.eos_id
    code = "def f(x):\n    return x + 1  # ünïcode ✓\n"
    assert corpus.decode(corpus.encode(code)) == code
    assert any("trained byte-level BPE" in m for m in messages)


# ---------------------------------------------------------------- caches

def test_tokenizer_and_token_caches_are_reused(folder, tmp_path):
    first, log1 = build(folder, tmp_path, val_fraction=0.2)
    cache = tmp_path / "cache"
    tok_files = list(cache.glob("tokenizer-*.json"))
    tokens_files = list(cache.glob("tokens-*.npz"))
    assert len(tok_files) == 1 and len(tokens_files) == 1
    assert not list(cache.glob(".tmp-*"))  # atomic writes leave no temp files
    mtimes = {p: p.stat().st_mtime_ns for p in tok_files + tokens_files}

    second, log2 = build(folder, tmp_path, val_fraction=0.2)
    assert any("tokenizer: loaded from cache" in m for m in log2)
    assert any("tokens: loaded from cache" in m for m in log2)
    assert not any("trained" in m for m in log2)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert torch.equal(first.train_tokens, second.train_tokens)
    assert first.fingerprint == second.fingerprint

    # A different split is a different corpus: new token arrays and fingerprint.
    third, log3 = build(folder, tmp_path, val_fraction=0.3)
    assert third.fingerprint != first.fingerprint
    assert any("tokens: tokenized" in m for m in log3)

    # A saved tokenizer.json can be used directly.
    fourth, _ = build(folder, tmp_path, val_fraction=0.2, tokenizer=str(tok_files[0]))
    assert torch.equal(fourth.train_tokens, first.train_tokens)


# ---------------------------------------------------------------- pre-tokenized sources

def test_bin_and_npy_sources(tmp_path):
    ids = np.arange(5000) % 300  # vocab inferred as 300
    ids.astype(np.uint16).tofile(tmp_path / "tokens.bin")
    np.save(tmp_path / "tokens.npy", ids.astype(np.int64))
    for name in ("tokens.bin", "tokens.npy"):
        corpus, _ = build(tmp_path / name, tmp_path, vocab_size=0, val_fraction=0.1)
        assert corpus.vocab_size == 300 and corpus.tokenizer is None
        assert corpus.train_tokens.numel() == 4500 and corpus.val_tokens.numel() == 500
        assert torch.equal(corpus.val_tokens.long(), torch.from_numpy(ids[4500:]))
    with pytest.raises(ValueError, match=r"data.vocab_size = 100 .* up to 299; set data.vocab_size >= 300"):
        build(tmp_path / "tokens.npy", tmp_path, vocab_size=100)
    np.save(tmp_path / "bad.npy", np.zeros((3, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="1-D integer array"):
        build(tmp_path / "bad.npy", tmp_path, vocab_size=0)


def test_pretokenized_non_iid_cuts_contiguous_ranges(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(4000) % 50)
    corpus, _ = build(tmp_path / "t.npy", tmp_path, vocab_size=0, val_fraction=0.0, partition="non-iid")
    assert corpus._noniid_ranges(4) == [(0, 1000), (1000, 2000), (2000, 3000), (3000, 4000)]


# ---------------------------------------------------------------- worker batches

def test_worker_batch_is_pure_and_shifted(corpus):
    x, y = corpus.worker_batch(1, 3, 7, 4, 16, seed=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    # Another corpus object (no cache), and calls in another order, give the same batch.
    fresh = Corpus(**{k: getattr(corpus, k) for k in (
        "vocab_size", "train_tokens", "val_tokens", "train_file_spans", "val_file_spans",
        "train_files", "val_files", "partition")})
    fresh.worker_batch(0, 3, 99, 4, 16, seed=0)
    x2, y2 = fresh.worker_batch(1, 3, 7, 4, 16, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, corpus.worker_batch(1, 3, 8, 4, 16, seed=0)[0])
    assert not torch.equal(x, corpus.worker_batch(1, 3, 7, 4, 16, seed=1)[0])
    # y is x shifted by one, and every row is a contiguous piece of the train stream.
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = corpus.train_tokens.long()
    for row_x, row_y in zip(x, y):
        starts = [s for s in range(0, stream.numel() - 16, 17) if torch.equal(stream[s:s + 16], row_x)]
        assert starts and torch.equal(stream[starts[0] + 1:starts[0] + 17], row_y)


def _window_starts(corpus, worker, M, steps, B, T, seed=0):
    """Recover where each row of the worker's batches starts in the train stream."""
    every = corpus.train_tokens.long().unfold(0, T + 1, 1)  # (N - T, T+1): window at each offset
    out = []
    for step in range(steps):
        x, y = corpus.worker_batch(worker, M, step, B, T, seed)
        w = torch.cat([x, y[:, -1:]], dim=1)  # (B, T+1)
        for row in w:
            hits = (every == row).all(-1).nonzero().flatten()
            assert len(hits) == 1  # synthetic text: each window occurs once
            out.append(int(hits[0]))
    return out


def test_iid_shards_disjoint_and_cover_the_stream_once_per_epoch(corpus):
    M, T, B = 3, 16, 5
    n_windows = corpus.train_tokens.numel() // (T + 1)
    shards = [set(corpus._shard(w, M, T, 0).tolist()) for w in range(M)]
    assert not (shards[0] & shards[1]) and not (shards[1] & shards[2]) and not (shards[0] & shards[2])
    assert set.union(*shards) == set(range(0, n_windows * (T + 1), T + 1))
    # A worker walks its whole shard once before repeating (epochs, without replacement).
    n0 = len(shards[0])
    steps = n0 // B
    seen = _window_starts(corpus, 0, M, steps, B, T)
    assert len(set(seen)) == len(seen) == steps * B and set(seen) <= shards[0]


def test_non_iid_workers_get_disjoint_whole_files(folder, tmp_path):
    corpus, _ = build(folder, tmp_path, val_fraction=0.2, partition="non-iid")
    M, T = 4, 16
    ranges = corpus._noniid_ranges(M)
    file_starts = {s for s, _ in corpus.train_file_spans}
    assert ranges[0][0] == 0 and ranges[-1][1] == corpus.train_tokens.numel()
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(s in file_starts for s, _ in ranges)  # cuts fall between files
    sizes = [e - s for s, e in ranges]
    assert max(sizes) < 2 * min(sizes)  # about balanced
    for w, (lo, hi) in enumerate(ranges):
        starts = _window_starts(corpus, w, M, 3, 4, T)
        assert all(lo <= s and s + T + 1 <= hi for s in starts)
    with pytest.raises(ValueError, match=r"19 training files for 20 workers"):
        corpus.worker_batch(0, 20, 0, 2, 8, seed=0)


def test_union_of_worker_batches_does_not_depend_on_who_asks(corpus):
    # What DP-vs-union-batch equivalence needs: worker m's batch is the same whether it is
    # drawn alone, next to other workers, or in another process (fresh object).
    a = [corpus.worker_batch(m, 2, 5, 3, 16, seed=4)[0] for m in range(2)]
    b = [corpus.worker_batch(m, 2, 5, 3, 16, seed=4)[0] for m in reversed(range(2))][::-1]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert torch.cat(a).shape == (6, 16)


def test_worker_batch_errors_carry_numbers(corpus):
    with pytest.raises(ValueError, match=r"worker must be in \[0, 2\) \(got 2\)"):
        corpus.worker_batch(2, 2, 0, 1, 8, seed=0)
    n = corpus.train_tokens.numel()
    with pytest.raises(ValueError, match=rf"{n} tokens = 0 windows of seq_len \+ 1 = {n + 1}"):
        corpus.worker_batch(0, 2, 0, 1, n, seed=0)


def test_eval_batches_deterministic_and_spread(corpus, folder, tmp_path):
    batches = corpus.eval_batches(batch_size=4, seq_len=16, max_batches=3)
    assert len(batches) == 3 and all(x.shape == (4, 16) for x, _ in batches)
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches)
    other, _ = build(folder, tmp_path, val_fraction=0.2, partition="non-iid")
    again = other.eval_batches(batch_size=4, seq_len=16, max_batches=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    # Windows are spread over the whole validation stream, not only its start.
    last = batches[-1][0][-1]
    val = corpus.val_tokens.long()
    pos = [s for s in range(0, val.numel() - 16) if torch.equal(val[s:s + 16], last)]
    assert pos and pos[0] > val.numel() // 2
    with pytest.raises(ValueError, match="validation split has"):
        corpus.eval_batches(4, corpus.val_tokens.numel(), 1)


# ---- records: JSONL and Parquet ----------------------------------------------------------

def _jsonl(path, texts, extra_lines=()):
    import json

    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"id": 1, "text": t}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def test_jsonl_records_are_documents_read_as_a_stream(tmp_path):
    texts = [f"def f{i}():\n    return {i} * {i}\n" * 20 for i in range(30)]
    src = _jsonl(tmp_path / "d.jsonl", texts, extra_lines=["this line is not JSON"])
    cap = sum(len(t) for t in texts[:12])
    docs, what = load_documents(src, cap)  # the bad last line is never read
    assert [d.text for d in docs] == texts[:12] and docs[3].name == "d.jsonl#3"
    assert what == f"file {src}"
    with pytest.raises(ValueError, match=r"line 31 is not JSON"):
        load_documents(src, 0)
    corpus = Corpus.build(DataConfig(source=_jsonl(tmp_path / "ok.jsonl", texts), vocab_size=300,
                                     val_fraction=0.1, cache_dir=str(tmp_path / "c")), log=lambda m: None)
    assert corpus.train_tokens.numel() > 0 and corpus.val_tokens.numel() > 0


@pytest.mark.parametrize("lines,message", [
    (['{"body": "x"}'], r"line 1 has no field 'text' \(data.text_field; it has: body\)"),
    (['{"text": 3}'], r"line 1: field 'text' is int, not text"),
    ([], r"contains no text \(no records, or every 'text' is empty\)"),
    (['{"text": ""}', ""], r"contains no text"),
])
def test_jsonl_errors_name_the_line_and_field(tmp_path, lines, message):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        load_documents(str(src), 0)


def test_parquet_column_streamed_and_missing_column_named(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i}: " + "abc " * (i + 1) for i in range(3000)]
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"content": texts, "n": list(range(3000))}), path, row_group_size=500)
    docs, _ = load_documents(path, 0, text_field="content")
    assert [d.text for d in docs] == texts and docs[-1].name == "d.parquet#2999"
    cap = sum(len(t) for t in texts[:100])
    assert [d.text for d in load_documents(path, cap, text_field="content")[0]] == texts[:100]
    with pytest.raises(ValueError, match=r"has no column 'text' \(data.text_field; it has: content, n\)"):
        load_documents(path, 0)
    bad = tmp_path / "not.parquet"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="is not a Parquet file"):
        load_documents(str(bad), 0)
