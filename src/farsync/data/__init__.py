"""Training data with no downloads: text on this machine (by default the Python standard
library's own sources), a locally trained byte-level BPE, and per-worker batches."""

from farsync.data.config import DataConfig
from farsync.data.corpus import Corpus
from farsync.data.sources import Document, load_documents, split_documents
from farsync.data.tokenizer import EOS_TOKEN, train_bpe

__all__ = [
    "Corpus",
    "DataConfig",
    "Document",
    "EOS_TOKEN",
    "load_documents",
    "split_documents",
    "train_bpe",
]
