"""The Llama model, its checkpoints and its tokenizer.

``load(name_or_path)`` gives ``(model, tokenizer)`` for the embedded default (``"smollm2-135m-instruct"``), a
Hugging Face directory, a GGUF file or a model another layer registered with ``register_built`` (the toy world's
warm start); ``load_hf``/``save_hf`` read and write Hugging Face checkpoints.
"""

from .hf_checkpoint import load_hf, load_llama_config, save_hf
from .llama import KVCache, Llama, LlamaConfig, RopeScaling
from .registry import load, register_built
from .tokenizer import Tokenizer

__all__ = ["KVCache", "Llama", "LlamaConfig", "RopeScaling", "Tokenizer", "load", "load_hf", "load_llama_config",
           "register_built", "save_hf"]
