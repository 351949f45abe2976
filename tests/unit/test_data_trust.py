"""Data files are trusted no further than they prove: a binary or non-UTF-8 text file,
a garbage or pickled .npy, a stray huge token id are refused in one line naming the
file (issue 24); a folder skips what is not text and says how many."""

from __future__ import annotations

import os

import numpy as np
import pytest



class Evil:
    """Unpickling this runs a shell command (creates a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _data(tmp_path, source, **kw):
    from farsync.data import Corpus, DataConfig

    return Corpus.build(DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), val_fraction=0.1, **kw),
                        log=lambda m: None)


def test_a_stray_huge_token_id_with_inferred_vocab_is_one_line(tmp_path):
    ids = np.arange(1000, dtype=np.int64) % 50
    ids[123] = 32_000_000_000
    np.save(tmp_path / "ids.npy", ids)
    with pytest.raises(ValueError, match=r"holds token id 32,000,000,000 \(at index 123\)"):
        _data(tmp_path, tmp_path / "ids.npy", vocab_size=0)
    ids[123] = 5_000_000  # fits int32, but not an inferred vocabulary
    np.save(tmp_path / "ids.npy", ids)
    with pytest.raises(ValueError, match="data.vocab_size = 0 would make a 5,000,001-entry embedding"):
        _data(tmp_path, tmp_path / "ids.npy", vocab_size=0)
    ids[123] = 7
    np.save(tmp_path / "ids.npy", ids)
    assert _data(tmp_path, tmp_path / "ids.npy", vocab_size=0).vocab_size == 50


def test_a_garbage_or_pickled_npy_names_the_file(tmp_path):
    (tmp_path / "g.npy").write_bytes(b"\x93NUMPY garbage" * 10)
    with pytest.raises(ValueError, match=f"data.source: '{tmp_path / 'g.npy'}' is not a NumPy .npy array file"):
        _data(tmp_path, tmp_path / "g.npy", vocab_size=0)
    marker = tmp_path / "ran"
    np.save(tmp_path / "o.npy", np.array([Evil(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=f"'{tmp_path / 'o.npy'}' is not a NumPy .npy array file"):
        _data(tmp_path, tmp_path / "o.npy", vocab_size=0)
    assert not marker.exists()


def test_binary_and_non_utf8_text_files_are_refused_naming_the_file(tmp_path):
    binary = tmp_path / "ls.txt"
    binary.write_bytes(open("/bin/ls", "rb").read()[:20000])
    with pytest.raises(ValueError, match=f"data.source: '{binary}' is not text"):
        _data(tmp_path, binary)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=f"data.source: '{latin}' is not UTF-8 text"):
        _data(tmp_path, latin)
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=f"'{jsonl}' line 2 is not UTF-8 text"):
        _data(tmp_path, jsonl)


def test_a_folder_skips_binary_files_and_says_how_many(tmp_path):
    from farsync.data.sources import load_documents

    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        (folder / f"good{i}.txt").write_text(f"hello {i}\n" * 50)
    (folder / "bad.txt").write_bytes(b"\x00\x01\x02binary" * 50)
    (folder / "latin.md").write_bytes("caf\u00e9\n".encode("latin-1") * 50)
    docs, what = load_documents(str(folder), 0)
    assert sorted(d.name for d in docs) == ["good0.txt", "good1.txt", "good2.txt"]
    assert "skipped 2 files that are not UTF-8 text: bad.txt, latin.md" in what
    (folder / "cut.txt").write_text("é" * 5000)  # a cap inside a 2-byte character without a line break
    docs, _ = load_documents(str(folder / "cut.txt"), 1001)
    assert "".join(d.text for d in docs) == "é" * 500
