"""The independent reference of the tests and benchmarks: transformers' ``LlamaForCausalLM`` holding our weights.

One place for it, so that every parity check (generation, saliency, the benchmarks) compares against the same
construction: the Hugging Face config comes from ``atmanrl.model.checkpoint.config_to_hf`` (the one we also write to
disk), parameter names get the ``model.`` prefix. Only tests and benchmarks import transformers.
"""

from __future__ import annotations

import torch

from atmanrl.model.checkpoint import config_to_hf
from atmanrl.model.llama import Llama


def hf_twin(model: Llama, attn_implementation: str = "sdpa"):
    """A ``transformers.LlamaForCausalLM`` with exactly ``model``'s weights and dtype, in eval mode."""
    import transformers

    dtype = model.embed_tokens.weight.dtype
    hf_config = transformers.LlamaConfig(**config_to_hf(model.config), attn_implementation=attn_implementation)
    with torch.device(model.embed_tokens.weight.device):  # built where the model is (a 3B init on a GPU, not a CPU)
        hf = transformers.LlamaForCausalLM(hf_config).to(dtype).eval()
    state = {(k if k == "lm_head.weight" else "model." + k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf
