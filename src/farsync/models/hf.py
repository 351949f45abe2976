"""Any Hugging Face ``transformers`` causal-LM architecture, built from a ``config.json``
with random weights (nothing is downloaded), behind the interface farsync's training
loop uses: ``model(x, y) -> (logits, loss)`` and ``num_parameters()``.

The wrapped model is the ``transformers`` module itself, unchanged (``.hf``): DiLoCo finds
its fragments in its decoder layers (Llama/Qwen2/Mistral-style ``model.layers``, GPT-2's
``transformer.h``), the largest ``nn.ModuleList`` in it. Needs ``pip install
'farsync[hf]'``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("model.hf_config needs the transformers package: pip install 'farsync[hf]'") from None
    return transformers


def load_hf_config(path: str, vocab_size: int, seq_len: int):
    """The architecture in ``path`` (a config.json, or a folder holding one), its
    vocabulary set to ``vocab_size`` (the corpus tokenizer's); ValueError naming what is
    wrong."""
    tf = _transformers()
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"model.hf_config: no such file: {file!r}")
    try:
        config = tf.AutoConfig.from_pretrained(file)
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"model.hf_config: {file!r} is not a transformers config ({str(e).splitlines()[0]})") from None
    config.vocab_size = vocab_size
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids of another vocabulary
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= vocab_size:
            setattr(config, key, None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and positions < seq_len:
        raise ValueError(f"model.hf_config: {file!r} allows {positions} positions, fewer than model.seq_len = {seq_len}")
    return config


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM with farsync's model interface."""

    def __init__(self, config):
        super().__init__()
        self.hf = _transformers().AutoModelForCausalLM.from_config(config)

    @classmethod
    def from_config_file(cls, path: str, vocab_size: int, seq_len: int) -> "HFCausalLM":
        return cls(load_hf_config(path, vocab_size, seq_len))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        logits = self.hf(input_ids=x).logits
        loss = None
        if y is not None:  # next-token targets are given: no shift here
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        return logits, loss

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor counted once; ``non_embedding`` leaves out the
        input embedding and an untied output head."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            seen = set()
            for m in (self.hf.get_input_embeddings(), self.hf.get_output_embeddings()):
                if m is not None and id(m.weight) not in seen:
                    seen.add(id(m.weight))
                    total -= m.weight.numel()
        return total
