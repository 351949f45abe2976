"""Text on this machine, as an ordered list of documents, and its train/validation split.

A *document* is one file (or, for a single-file source, one piece of it). Everything
downstream works per document: validation holds out whole documents, and the non-iid
partition gives each worker a contiguous block of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass

# Suffixes taken from a folder source. A single file given as the source is read whatever
# its suffix (except the pre-tokenized ones).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".pyi", ".tex", ".c", ".h", ".cc", ".cpp",
                 ".js", ".ts", ".go", ".rs", ".java", ".html", ".css")

# Left out of the stdlib corpus. The test suites are more than half of the stdlib's bytes
# and hold deliberately odd files (bad encodings, broken syntax, data blobs); installed
# third-party packages would make the corpus depend on what else is installed; and the
# build-configuration files hold machine-specific paths, which would make the corpus
# differ between two installs of the same Python.
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
STDLIB_SKIP_PREFIXES = ("config-", "_sysconfigdata")

# Files of records, one document each (see load_records).
RECORD_SUFFIXES = (".jsonl", ".parquet")

# A single text file is cut into this many documents (at line breaks) so that it can
# still be split by document for validation and for the non-iid partition.
SINGLE_FILE_PIECES = 64


@dataclass(frozen=True)
class Document:
    name: str  # relative path ("asyncio/events.py"), or "file.txt#3" for a piece
    text: str


def stdlib_root() -> str:
    """Directory of the running interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames
            if d not in STDLIB_SKIP_DIRS and not d.startswith((".",) + STDLIB_SKIP_PREFIXES)
        ]
        for f in filenames:
            if f.endswith(".py") and not f.startswith(STDLIB_SKIP_PREFIXES):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    return found


def _folder_files(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(TEXT_SUFFIXES):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    return found


class NotText(ValueError):
    """A file that is not UTF-8 text (a binary, or another encoding)."""


def _read_text(path: str, limit: int = 0) -> str:
    """The file's text, UTF-8 (NotText if it is not: NUL bytes, or bytes UTF-8 cannot be)."""
    with open(path, "rb") as fh:
        data = fh.read(limit) if limit else fh.read()
    cut = bool(limit) and len(data) == limit
    if cut:
        # Cut at the last line break so the text does not end in a broken character.
        at = data.rfind(b"\n")
        if at > 0:
            data = data[: at + 1]
    if b"\0" in data:
        raise NotText(f"{path!r} is not text (it holds NUL bytes: a binary file?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if cut and e.reason == "unexpected end of data":  # a character cut at the byte limit
            return data[: e.start].decode("utf-8", errors="strict")
        raise NotText(f"{path!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}: a binary "
                      "file, or another encoding?)") from None


def _split_lines(name: str, text: str, pieces: int) -> list[Document]:
    """Cut text into about ``pieces`` documents of similar size, at line breaks."""
    lines = text.splitlines(keepends=True)
    target = max(1, len(text) // pieces)
    docs, buf, size = [], [], 0
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= target:
            docs.append("".join(buf))
            buf, size = [], 0
    if buf:
        docs.append("".join(buf))
    return [Document(f"{name}#{i}", t) for i, t in enumerate(docs)]


def load_documents(source: str, max_bytes: int, text_field: str = "text") -> tuple[list[Document], str]:
    """The source's documents in sorted order, capped at ``max_bytes``; and a description.

    Files are taken whole, in sorted order of their relative paths, while their sizes on
    disk add up to at most ``max_bytes`` (a deterministic prefix of the list); the first
    file is cut at a line break if it alone is larger. ``max_bytes = 0`` takes everything.
    Records (.jsonl, .parquet): see :func:`load_records`.
    """
    if source != "stdlib" and source.lower().endswith(RECORD_SUFFIXES):
        return load_records(source, max_bytes, text_field)
    if source == "stdlib":
        root = stdlib_root()
        names = _stdlib_files(root)
        what = f"the Python standard library at {root}"
    elif os.path.isdir(source):
        root = source
        names = _folder_files(root)
        what = f"folder {source}"
        if not names:
            raise ValueError(
                f"data.source: {source!r} contains no text files "
                f"(looked for {', '.join('*' + s for s in TEXT_SUFFIXES)})"
            )
    else:
        root, names = os.path.dirname(source) or ".", [os.path.basename(source)]
        what = f"file {source}"
    names.sort(key=lambda n: n.replace(os.sep, "/"))

    docs: list[Document] = []
    total = 0
    skipped: list[str] = []  # a folder's files that are not UTF-8 text
    single = len(names) == 1 and not os.path.isdir(source) and source != "stdlib"
    for name in names:
        path = os.path.join(root, name)
        size = os.path.getsize(path)
        try:
            if max_bytes and total + size > max_bytes:
                if not docs:  # first file alone exceeds the cap: take a cut of it
                    docs.append(Document(name.replace(os.sep, "/"), _read_text(path, max_bytes)))
                break
            docs.append(Document(name.replace(os.sep, "/"), _read_text(path)))
        except NotText as e:
            if single:
                raise ValueError(f"data.source: {e}; farsync reads text sources as UTF-8") from None
            skipped.append(name.replace(os.sep, "/"))
            continue
        total += size
    if skipped:
        what += (f" (skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} that are not UTF-8 text: "
                 f"{', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})")
    docs = [d for d in docs if d.text]
    if not docs:
        raise ValueError(f"data.source: {source!r} contains no text"
                         + (f" (skipped {len(skipped)} files that are not UTF-8 text)" if skipped else ""))

    if len(names) == 1 and source != "stdlib":
        docs = _split_lines(docs[0].name, docs[0].text, SINGLE_FILE_PIECES)
    return docs, what


def load_records(source: str, max_bytes: int, text_field: str) -> tuple[list[Document], str]:
    """One document per record of a .jsonl or .parquet file: its ``text_field``, in file
    order, named ``file#index``. Read as a stream: records are taken while their text adds
    up to at most ``max_bytes`` (UTF-8; 0 = all), and nothing after that is read."""
    base = os.path.basename(source)
    records = _parquet_texts(source, text_field) if source.lower().endswith(".parquet") else _jsonl_texts(source, text_field)
    docs: list[Document] = []
    total = 0
    for i, text in records:
        size = len(text.encode("utf-8"))
        if max_bytes and total + size > max_bytes and docs:
            break
        if text:
            docs.append(Document(f"{base}#{i}", text))
        total += size
    if not docs:
        raise ValueError(f"data.source: {source!r} contains no text (no records, or every {text_field!r} is empty)")
    return docs, f"file {source}"


def _jsonl_texts(source: str, field: str):
    with open(source, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"data.source: {source!r} line {n} is not UTF-8 text (a binary file?)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data.source: {source!r} line {n} is not JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"data.source: {source!r} line {n} has no field {field!r} "
                                 f"(data.text_field; it has: {keys})")
            if not isinstance(record[field], str):
                raise ValueError(f"data.source: {source!r} line {n}: field {field!r} is "
                                 f"{type(record[field]).__name__}, not text")
            yield n - 1, record[field]


def _parquet_texts(source: str, column: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("data.source: reading Parquet needs pyarrow: pip install 'farsync[parquet]'") from None
    try:
        pf = pq.ParquetFile(source)
    except Exception as e:  # pyarrow raises its own error types for a file that is not Parquet
        raise ValueError(f"data.source: {source!r} is not a Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise ValueError(f"data.source: {source!r} has no column {column!r} (data.text_field; "
                         f"it has: {', '.join(names)})")
    i = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"data.source: {source!r} row {i}: column {column!r} is "
                                 f"{type(text).__name__}, not text")
            yield i, text or ""
            i += 1


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val), both in the original order; no document is in both.

    The ``round(val_fraction * n)`` documents (at least 1 when val_fraction > 0) whose
    path hashes lowest go to validation. A hash rather than a random draw: the choice
    depends on nothing but the names, and adding a file does not reshuffle the others.
    """
    if val_fraction <= 0:
        return list(docs), []
    n_val = max(1, round(val_fraction * len(docs)))
    if n_val >= len(docs):
        raise ValueError(
            f"data.source has {len(docs)} document(s); validation is split by file, so "
            f"data.val_fraction = {val_fraction} would leave no training data: add files, "
            f"raise data.max_bytes, or set data.val_fraction = 0"
        )
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    val_names = {d.name for d in ranked[:n_val]}
    return [d for d in docs if d.name not in val_names], [d for d in docs if d.name in val_names]


def documents_hash(train: list[Document], val: list[Document]) -> str:
    """sha256 over names and texts of both splits: identifies the text and the split."""
    h = hashlib.sha256()
    for split, docs in (("train", train), ("val", val)):
        for d in docs:
            for part in (split, d.name, d.text):
                b = part.encode("utf-8")
                h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no ambiguity
                h.update(b)
    return h.hexdigest()
