"""The Llama model, its checkpoints and its tokenizer.

``load(name_or_path)`` gives ``(model, tokenizer)`` for the embedded default (``"smollm2-135m-instruct"``), a
Hugging Face directory or a GGUF file; ``load_hf``/``save_hf`` read and write Hugging Face checkpoints.
"""

from .checkpoint import load_config, load_hf, save_hf
from .llama import KVCache, Llama, LlamaConfig, RopeScaling
from .registry import load
from .tokenizer import Tokenizer

__all__ = ["KVCache", "Llama", "LlamaConfig", "RopeScaling", "Tokenizer", "load", "load_config", "load_hf", "save_hf"]
