"""Batched sampling with a KV cache, and the plain-forward log-probs the trainer recomputes.

The two functions here are a pair: GRPO's ``logp_old`` comes from ``generate`` and the trainer's ``logp`` from
``sequence_logprobs``; their ratio must be exactly 1 before the first update (up to float rounding), so both
compute the same quantity, ``log_softmax(logits / temperature)[token]``.

What is notable here:
- **Which log-probability.** ``Completion.logprobs[i]`` is the log-probability of the sampled token under the
  *tempered, untruncated* distribution ``log_softmax(logits / temperature)``. At ``top_p = 1`` that is exactly
  the distribution the token was drawn from. With ``top_p < 1`` the token is drawn from the nucleus renormalised
  (probability ``p / Z_nucleus``), but we still return ``log p`` (no ``- log Z_nucleus``): that is what
  ``sequence_logprobs`` recomputes, so the importance ratio starts at 1; the nucleus only acts as a proposal
  filter. With ``greedy=True`` the argmax is taken and its log-prob under ``log_softmax(logits / temperature)``
  is returned.
- **Stop tokens.** ``Completion.tokens`` includes the stop token when one was hit (``finished=True``); the trainer
  then also trains the decision to stop. A sequence cut at ``max_new_tokens`` has ``finished=False``.
- **Left padding, exactly.** Prompts of different lengths are left-padded so that every sequence's next token sits
  in the same cache slot. Padded key slots get ``-inf`` in ``attn_bias`` (weight exactly 0) and the rotary
  positions of real tokens start at 0 in every row, so a sequence's tokens and log-probs do not depend on its
  batch neighbours (up to float rounding of differently shaped matmuls). Pad *query* rows see only themselves,
  because a row whose every key is ``-inf`` would give NaN.
- **Cheap steps.** Identical prompts (k samples of one problem, G rollouts of one query) are prefilled once and
  their cache rows copied; the LM head runs on the last position only; the pad bias is built once and sliced per
  step; finished sequences are dropped from the batch (``KVCache.select``) once a quarter of it has finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atmanrl.model.llama import KVCache, Llama


@dataclass
class Completion:
    """One generated continuation of one prompt."""

    tokens: list[int]  # new token ids, including the stop token when one was hit
    logprobs: list[float]  # log_softmax(logits / temperature)[token] for each token (see module docstring)
    finished: bool  # True: a stop token was hit; False: cut at max_new_tokens


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """Left-pad token lists to one length.

    Returns ``tokens (B, P)``, rotary ``positions (B, P)`` (0 at each row's first real token; pads get 0 too,
    which is harmless because nothing attends to them) and ``is_pad (B, P)``. Shared with the saliency module's
    prompt prefix (``atmanrl.saliency.batch``).
    """
    P = max(len(p) for p in prompts)
    pads = torch.tensor([P - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    slots = torch.arange(P, device=device)[None, :]
    is_pad = slots < pads[:, None]
    positions = (slots - pads[:, None]).clamp(min=0)
    return tokens, positions, is_pad


def _pad_bias(is_pad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Prefill bias ``(B, 1, P, P)``: -inf on pad key columns, except each pad query's own slot (no NaN rows)."""
    P = is_pad.shape[1]
    eye = torch.eye(P, dtype=torch.bool, device=is_pad.device)
    hide = is_pad[:, None, None, :] & ~eye  # (B, 1, P, P)
    return torch.zeros(hide.shape, dtype=dtype, device=is_pad.device).masked_fill(hide, float("-inf"))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability mass reaches ``top_p`` (the nucleus)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays (mass_before = 0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def _pick(logits, temperature, top_p, greedy, generator):
    """Next token ``(B,)`` and its log-prob under ``log_softmax(logits / temperature)`` ``(B,)``."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, V): what sequence_logprobs recomputes
    if greedy:
        token = logits.argmax(-1)
    else:
        probs = logp.exp()
        if top_p < 1.0:
            probs = _top_p_filter(probs, top_p)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


@torch.inference_mode()
def generate(
    model: Llama,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    stop_ids=(),
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> list[Completion]:
    """Continue every prompt (token ids, chat template already applied) by at most ``max_new_tokens`` tokens.

    Sampling draws from ``softmax(logits / temperature)``, restricted to the top-p nucleus when ``top_p < 1``;
    ``greedy=True`` takes the argmax. Pass a seeded ``torch.Generator`` to make sampling repeat. A sequence stops
    at the first token in ``stop_ids`` (e.g. the tokenizer's end-of-turn ids). Returns one ``Completion`` per
    prompt, in order. See the module docstring for exactly what ``logprobs`` holds.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy=True for argmax decoding")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 1:
        return [Completion([], [], False) for _ in prompts]
    device = next(model.parameters()).device
    dtype = model.embed_tokens.weight.dtype
    B = len(prompts)

    # Identical prompts are prefilled once; `expand` maps each prompt to its unique row.
    unique: dict[tuple, int] = {}
    expand = torch.tensor([unique.setdefault(tuple(p), len(unique)) for p in prompts], device=device)
    tokens, positions, is_pad = left_pad([list(p) for p in unique], pad_id, device)
    P = tokens.shape[1]
    padded = bool(is_pad.any())

    cache = KVCache(model.config, tokens.shape[0], P + max_new_tokens, device=device, dtype=dtype)
    last = torch.full((1, 1), P - 1, device=device)
    logits = model(tokens, _pad_bias(is_pad, dtype) if padded else None, positions=positions, cache=cache,
                   logits_at=last)[:, -1]  # (B_unique, V)
    if len(unique) < B:
        cache, logits = cache.select(expand), logits[expand]
    is_pad, next_pos = is_pad[expand], positions[expand, -1] + 1
    # Decode-step bias over all cache slots (-inf on pads), sliced to the visible slots at each step.
    step_bias = None
    if padded:
        step_bias = torch.zeros(B, 1, 1, P + max_new_tokens, dtype=dtype, device=device)
        step_bias[:, 0, 0, :P].masked_fill_(is_pad, float("-inf"))

    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    out_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    out_logp = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    length = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)  # original index of each row still in the batch
    alive = torch.ones(B, dtype=torch.bool, device=device)  # rows in the batch that have not stopped yet

    for t in range(max_new_tokens):
        token, logp = _pick(logits, temperature, top_p, greedy, generator)
        live = rows[alive]
        out_tokens[live, t], out_logp[live, t] = token[alive], logp[alive]
        length[live] += 1
        hit = alive & torch.isin(token, stop)
        finished[rows[hit]] = True
        alive &= ~hit
        n_alive = int(alive.sum())
        if n_alive == 0 or t == max_new_tokens - 1:
            break
        if len(rows) - n_alive >= max(1, len(rows) // 4):  # drop finished rows: later steps cost less
            keep = alive.nonzero().squeeze(-1)
            cache, rows, token, next_pos = cache.select(keep), rows[keep], token[keep], next_pos[keep]
            step_bias = step_bias[keep] if step_bias is not None else None
            alive = alive[keep]
        start = P + t
        bias = step_bias[..., : start + 1] if step_bias is not None else None
        logits = model(token[:, None], bias, positions=next_pos[:, None], cache=cache, start_pos=start)[:, -1]
        next_pos = next_pos + 1

    out_tokens, out_logp, length, finished = out_tokens.tolist(), out_logp.tolist(), length.tolist(), finished.tolist()
    return [
        Completion(out_tokens[b][: length[b]], out_logp[b][: length[b]], finished[b]) for b in range(B)
    ]


def sequence_logprobs(
    model: Llama,
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    temperature: float = 1.0,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log_softmax(logits / temperature)[token]`` of each completion, from one plain forward.

    This is the recompute path of the trainer (it keeps gradients when called outside ``inference_mode``), and
    the parity partner of ``generate``'s ``logprobs``. Each row is ``prompt + completion``, RIGHT-padded: with a
    causal mask trailing pads can never influence earlier tokens, so no attention bias is needed. The LM head
    runs only at the positions that predict completion tokens.

    Returns ``logprobs (B, C)`` with ``C`` the longest completion (0 where padded) and ``mask (B, C)`` (True on
    real completion tokens).
    """
    device = next(model.parameters()).device
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; pass one completion per prompt")
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    C = max(len(c) for c in completions)
    tokens = torch.tensor([list(p) + list(c) + [pad_id] * (L - len(p) - len(c)) for p, c in zip(prompts, completions)],
                          dtype=torch.long, device=device)
    mask = torch.tensor([[j < len(c) for j in range(C)] for c in completions], dtype=torch.bool, device=device)
    # Logits at position len(prompt) - 1 + j predict completion token j.
    at = torch.tensor([[len(p) - 1 + j if j < len(c) else 0 for j in range(C)] for p, c in zip(prompts, completions)],
                      dtype=torch.long, device=device)
    targets = torch.tensor([list(c) + [0] * (C - len(c)) for c in completions], dtype=torch.long, device=device)
    logits = model(tokens, logits_at=at)  # (B, C, V)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return logp.masked_fill(~mask, 0.0), mask
