"""Model definitions: pure PyTorch, no knowledge of distribution."""

from farsync.models.llama import MODEL_SIZES, Llama, LlamaConfig, model_config

__all__ = ["MODEL_SIZES", "Llama", "LlamaConfig", "model_config"]
