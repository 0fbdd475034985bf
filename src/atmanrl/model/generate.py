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
- **Randomness per row, not per call.** Each row has its own seed; the token of row ``b`` at step ``t`` is the
  Gumbel-max draw ``argmax(logp + G)`` whose noise ``G`` is a pure function of (row seed, ``t``, token id): uniforms
  from a counter-based integer hash (``sampling_noise``). So a row samples the same tokens whatever else is in the
  batch, however the batch is split (one call per update or per problem, one rank or eight), and the step needs no
  generator state: it is a plain vectorised function, which a CUDA graph can capture.
- **Stop tokens.** ``Completion.tokens`` includes the stop token when one was hit (``finished=True``); the trainer
  then also trains the decision to stop. A sequence cut at ``max_new_tokens`` has ``finished=False``.
- **Left padding, exactly.** Prompts of different lengths are left-padded so that every sequence's next token sits
  in the same cache slot. Padded key slots are hidden (``llama.hidden_key_bias``) and the rotary positions of real
  tokens start at 0 in every row, so a sequence's tokens and log-probs do not depend on its batch neighbours (up to
  float rounding of differently shaped matmuls).
- **Prefill, then one small step.** Identical prompts (k samples of one problem, G rollouts of one query) are
  prefilled once and their cache rows copied; the LM head runs on the last position only. Every later token is one
  call of ``decode_one_token`` (model forward of one token per row + the pick of the next token).
- **Compiled on CUDA.** ``compile=None`` compiles the step on CUDA (``torch.compile(mode="reduce-overhead")``, a
  CUDA graph: one launch per token instead of ~15 kernels per layer) and runs it eagerly elsewhere. The compiled
  step has static shapes: a fixed batch (finished rows keep decoding, masked, instead of being dropped), and the
  step's slot passed as a tensor (``Llama.forward``). Its attention is FlexAttention on CUDA (``Llama.attention``
  ``auto``): grouped-query heads read in place, the key blocks past the current slot skipped, so the static cache's
  unwritten tail costs nothing (SDPA with a mask would run its math backend here, see docs/DESIGN.md).
- **One cache geometry per kind of call.** A CUDA graph reads its cache at fixed addresses and a compiled step is
  specialised to its shapes, so the compiled path keeps its caches for the whole process (``static_cache``): one
  per row bucket (a call of ``B`` rows uses a kept cache of ``B`` to ``ROW_SLACK * B - 1`` rows, its spare rows
  decoding a copy of the first prompt, else a new one of the next power of two), each with a length that only
  grows (a multiple of ``CACHE_BUCKET``). Rollouts (64 rows) and evaluation (8 rows) then each keep one geometry:
  rollout -> evaluation -> rollout neither recompiles nor re-records; a cache re-allocates (one recompile) only
  when a longer prompt than ever before needs more slots. ``compile_count()`` counts compiled graphs so a caller
  can see a recompilation.
- **No host sync per token on the compiled path.** The slot and step are device tensors advanced in place, the
  tokens each step produced are counted on the device, and the host looks at the stop flags once every
  ``STOP_CHECK_EVERY`` steps (one transfer; ``on_step`` is then called for each of those steps, in order). A batch
  whose rows have all stopped runs at most ``STOP_CHECK_EVERY - 1`` idle steps, whose outputs are discarded. The
  eager step checks every step: it attends only to the slots written so far and drops finished rows once a
  quarter of the batch has finished (on a CPU, later steps then cost less).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from atmanrl.model.llama import KVCache, Llama, hidden_key_bias

CACHE_BUCKET = 256  # the compiled step's cache length is a multiple of this (one graph for many prompt lengths)
ROW_SLACK = 4  # a compiled call of B rows reuses a kept cache of fewer than ROW_SLACK * B rows (module docstring)
STOP_CHECK_EVERY = 16  # compiled path: decode steps between two host reads of the stop flags
COMPILE_ON = {"cuda"}  # device types on which generate(compile=None) compiles the step (benchmarks/gpu.py --tiny: cpu)


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


def check_tokens(model: Llama, sequences: Sequence[Sequence[int]], what: str, *, pad_id: int | None = None,
                 extra_positions: int = 0) -> None:
    """Refuse token ids outside the model's vocabulary and sequences longer than its position table.

    ``extra_positions``: positions the caller will add after each sequence (``max_new_tokens`` of a generation).
    Raised as ``ValueError`` naming the sequence, the id or the length, and the limit -- instead of the embedding's
    ``index out of range in self`` or silently wrong rotary positions past the trained range.
    """
    vocab, limit = model.config.vocab_size, model.config.max_position_embeddings
    if pad_id is not None and not 0 <= pad_id < vocab:
        raise ValueError(f"pad_id {pad_id} is outside the model's vocabulary [0, {vocab}); pass the tokenizer's pad "
                         f"id (any id in range works: padded slots are hidden)")
    for i, seq in enumerate(sequences):
        bad = next((j for j, t in enumerate(seq) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"{what} {i} has token id {seq[bad]} at position {bad}, outside the model's vocabulary "
                             f"[0, {vocab}); was it tokenized with another model's tokenizer?")
        if len(seq) + extra_positions > limit:
            extra = f" + {extra_positions} new tokens" if extra_positions else ""
            raise ValueError(f"{what} {i} needs {len(seq) + extra_positions} positions ({len(seq)} tokens{extra}), "
                             f"more than the model's max_position_embeddings {limit}; shorten it"
                             f"{' or lower max_new_tokens' if extra_positions else ''}")


# ---------------------------------------------------------------------------------------------------------------
# Sampling: Gumbel-max with counter-based noise
# ---------------------------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanche hash of 32-bit values held in int64 (multipliers < 2^31, so no product overflows int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


_SEED_PRIMES = (1_000_003, 1_000_033, 1_000_037)


def row_seed(*parts: int) -> int:
    """One row's sampling seed from up to four integers (e.g. run seed, update, problem index, sample index):
    ``((a * p1 + b) * p2 + c) * p3 + d``, with three primes above 10^6, so indices below 10^6 never collide. The
    callers that seed one row per (problem, sample) all use it, so a row's tokens are a function of these numbers
    alone, not of the batch it is generated in."""
    if not 1 <= len(parts) <= len(_SEED_PRIMES) + 1:
        raise ValueError(f"row_seed takes 1 to {len(_SEED_PRIMES) + 1} integers, got {len(parts)}")
    h = parts[0]
    for prime, part in zip(_SEED_PRIMES, parts[1:]):
        h = h * prime + part
    return h


def row_keys(seeds: Sequence[int], device=None) -> torch.Tensor:
    """``(B, 2)`` int64: two 32-bit words per row, from any Python int seed (hashed, so nearby seeds differ)."""
    words = []
    for s in seeds:
        h = _splitmix64(int(s) & _M64 ^ _splitmix64(int(s) >> 64 & _M64))
        words.append([h & _M32, h >> 32])
    return torch.tensor(words, dtype=torch.long, device=device)


def sampling_noise(keys: torch.Tensor, step: torch.Tensor | int, vocab: int) -> torch.Tensor:
    """Gumbel noise ``(B, vocab)`` float32: a pure function of (row key, step, token id).

    Uniforms in (0, 1) with 24 random bits from a counter-based hash, then ``-log(-log(u))``. Vectorised integer
    ops only: no generator state, the same on every device, capturable in a CUDA graph.
    """
    step = torch.as_tensor(step, dtype=torch.long, device=keys.device)
    h = _mix32(keys[:, 0] ^ _mix32((step + 0x165667B1) & _M32))  # (B,)
    h = _mix32(h ^ keys[:, 1])
    ids = torch.arange(vocab, device=keys.device, dtype=torch.long)
    bits = _mix32(_mix32((h[:, None] + ids[None, :] * 0x61C88647) & _M32) ^ h[:, None])  # (B, V)
    u = ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability mass reaches ``top_p`` (the nucleus)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays (mass_before = 0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def _pick(logits, temperature: float | torch.Tensor, top_p: float, greedy: bool, keys: torch.Tensor, step):
    """Next token ``(B,)`` and its log-prob under ``log_softmax(logits / temperature)`` ``(B,)``.

    Sampling is the Gumbel-max trick: ``argmax(logp + G)`` with ``G`` i.i.d. Gumbel draws a token with probability
    ``softmax(logp)``; outside the nucleus (``top_p < 1``) ``logp`` is ``-inf``, which draws from the renormalised
    nucleus.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, V): what sequence_logprobs recomputes
    if greedy:
        token = logits.argmax(-1)
    else:
        scores = logp
        if top_p < 1.0:
            scores = logp.masked_fill(_top_p_filter(logp.exp(), top_p) == 0, float("-inf"))
        token = (scores + sampling_noise(keys, step, logp.shape[-1])).argmax(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Prefill and the decode step
# ---------------------------------------------------------------------------------------------------------------


def prefill(model: Llama, prompts: list[list[int]], cache_len: int, pad_id: int):
    """Run every distinct prompt once; return the cache (one row per prompt), the last logits ``(B, V)``, which
    cache slots are padding ``(B, P)`` and each row's next rotary position ``(B,)``."""
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    unique: dict[tuple, int] = {}
    expand = torch.tensor([unique.setdefault(tuple(p), len(unique)) for p in prompts], device=device)
    tokens, positions, is_pad = left_pad([list(p) for p in unique], pad_id, device)
    P = tokens.shape[1]
    cache = KVCache(model.config, tokens.shape[0], cache_len, device=device, dtype=dtype)
    bias = hidden_key_bias(is_pad, dtype) if bool(is_pad.any()) else None
    last = torch.full((1, 1), P - 1, device=device)
    logits = model(tokens, bias, positions=positions, cache=cache, logits_at=last)[:, -1]  # (B_unique, V)
    if len(unique) < len(prompts):
        cache, logits = cache.select(expand), logits[expand]
    return cache, logits, is_pad[expand], positions[expand, -1] + 1


def decode_one_token(model: Llama, token, position, slot, cache: KVCache, key_bias, keys, step, *,
                     temperature: float, top_p: float, greedy: bool):
    """One decode step: feed ``token (B,)`` at rotary ``position (B,)`` into cache ``slot``; pick the next token.

    ``slot`` is an int (eager: attend over slots ``[0, slot]``) or a 0-dim tensor (compiled: attend over the whole
    cache, later slots hidden, static shapes). ``key_bias (B, 1, 1, cache_len)`` hides padded prompt slots (None:
    no padding). ``step`` indexes the sampling noise of the token being picked. Returns ``(token, logp)``, each
    ``(B,)``.
    """
    bias = key_bias
    if bias is not None and not isinstance(slot, torch.Tensor):
        bias = bias[..., : slot + 1]
    logits = model(token[:, None], bias, positions=position[:, None], cache=cache, start_pos=slot)[:, -1]
    return _pick(logits, temperature, top_p, greedy, keys, step)


_compiled_steps: dict[str, object] = {}
# The compiled step's caches, per model (dropped with it): {(dtype, device, rows): KVCache}. See static_cache.
_static_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def static_cache(model: Llama, batch_size: int, cache_len: int) -> KVCache:
    """The compiled step's KV cache for a call of ``batch_size`` rows that needs ``cache_len`` slots.

    Kept for the life of the model (a CUDA graph reads and writes the cache at fixed addresses, and the compiled
    step is specialised to its shapes: a fresh cache per call would re-record or recompile every call). The kept
    cache with the fewest rows in ``[batch_size, ROW_SLACK * batch_size)`` is used, else a new one of
    ``batch_size`` rounded up to a power of two; a cache shorter than ``cache_len`` is re-allocated at that length
    (lengths only grow). The returned cache may have more rows and slots than asked for.
    """
    w = model.embed_tokens.weight
    kept = _static_caches.setdefault(model, {})
    fits = [rows for (dtype, device, rows) in kept if dtype == w.dtype and device == w.device
            and batch_size <= rows < ROW_SLACK * batch_size]
    rows = min(fits) if fits else 1 << (batch_size - 1).bit_length()
    key = (w.dtype, w.device, rows)
    if key not in kept or kept[key].max_len < cache_len:
        kept.pop(key, None)  # free the short one before allocating its successor
        cache = KVCache(model.config, rows, cache_len, device=w.device, dtype=w.dtype)
        if w.device.type == "cuda":
            for buf in (*cache.k, *cache.v):
                torch._dynamo.mark_static_address(buf)
        kept[key] = cache
    return kept[key]


def compiled_decode_one_token(mode: str):
    """``decode_one_token`` under ``torch.compile(mode=mode, fullgraph=True, dynamic=False)``, built once per mode.

    ``dynamic=False``: each cache geometry gets its own static-shape graph (a CUDA graph needs fixed shapes) instead
    of dynamo turning the batch or cache length symbolic when it sees a second one."""
    if mode not in _compiled_steps:
        _compiled_steps[mode] = torch.compile(decode_one_token, mode=mode, fullgraph=True, dynamic=False)
    return _compiled_steps[mode]


def compile_count() -> int:
    """Graphs compiled so far by ``torch.compile`` in this process (torch._dynamo's counter): a caller compares it
    before and after a call to see whether that call (re)compiled."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


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
    seed: int | Sequence[int] = 0,
    pad_id: int = 0,
    compile: bool | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[Completion]:
    """Continue every prompt (token ids, chat template already applied) by at most ``max_new_tokens`` tokens.

    Sampling draws from ``softmax(logits / temperature)``, restricted to the top-p nucleus when ``top_p < 1``;
    ``greedy=True`` takes the argmax. ``seed``: one seed per prompt (a sequence of ints), or one int from which
    row ``b`` gets the seed ``(seed, b)``; a row's tokens depend only on its prompt and its seed (module
    docstring). A sequence stops at the first token in ``stop_ids`` (e.g. the tokenizer's end-of-turn ids).
    ``compile``: compile the decode step (None: on CUDA only). ``on_step(tokens)``: called once for every decode
    step with the number of tokens it produced (one per row still running), for progress display -- after the
    step on the eager path, at the next stop check (every ``STOP_CHECK_EVERY`` steps) on the compiled one. Returns
    one ``Completion`` per prompt, in order.
    See the module docstring for exactly what ``logprobs`` holds.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 (got {temperature}); for argmax decoding pass "
                         f"greedy=True (its log-probs are still reported under the temperature)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}; 1 disables the nucleus filter")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    B = len(prompts)
    if isinstance(seed, int):
        seeds = [(seed << 32) + b for b in range(B)]
    else:
        seeds = list(seed)
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} prompts; pass one seed per prompt, or one int")
    if max_new_tokens < 1:
        return [Completion([], [], False) for _ in prompts]
    check_tokens(model, prompts, "prompt", pad_id=pad_id, extra_positions=max_new_tokens)
    sample = dict(temperature=temperature, top_p=top_p, greedy=greedy)
    device = model.embed_tokens.weight.device
    compiled = device.type in COMPILE_ON if compile is None else compile
    decode = _decode_compiled if compiled else _decode_eager
    out_tokens, out_logp, length, finished = decode(model, prompts, seeds, max_new_tokens, stop_ids, pad_id, on_step,
                                                    sample)
    return [Completion(out_tokens[b][: length[b]], out_logp[b][: length[b]], finished[b])
            for b in range(len(prompts))]


class _Outputs:
    """The tokens, log-probs, lengths and stop flags of a generation, kept on the device until the end; also the
    per-step count of tokens produced, read by the host only at stop checks."""

    def __init__(self, B: int, max_new_tokens: int, stop_ids, device):
        self.stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        self.tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        self.logp = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
        self.length = torch.zeros(B, dtype=torch.long, device=device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.produced = torch.zeros(max_new_tokens, dtype=torch.long, device=device)  # tokens made at each step
        self.reported = 0  # steps already passed to on_step

    def record(self, t: int, rows, alive, token, logp):
        """Step ``t``'s tokens of the rows still in the batch (``rows``); returns ``alive`` after this step's stops.
        Device ops only: no host sync."""
        self.tokens[rows, t] = torch.where(alive, token, self.tokens[rows, t])
        self.logp[rows, t] = torch.where(alive, logp, self.logp[rows, t])
        self.length[rows] += alive
        self.produced[t] = alive.sum()
        hit = alive & torch.isin(token, self.stop)
        self.finished[rows] |= hit
        return alive & ~hit

    def check(self, t: int, alive, on_step) -> int:
        """The one host sync: report steps up to ``t`` to ``on_step`` (steps after every row stopped produced
        nothing and are not reported); return how many rows are still running."""
        *counts, n_alive = torch.cat([self.produced[self.reported: t + 1], alive.sum()[None]]).tolist()
        self.reported = t + 1
        if on_step is not None:
            for n in counts:
                if n:
                    on_step(n)
        return n_alive

    def lists(self):
        return self.tokens.tolist(), self.logp.tolist(), self.length.tolist(), self.finished.tolist()


def _decode_eager(model, prompts, seeds, max_new_tokens, stop_ids, pad_id, on_step, sample):
    """The eager loop: attends to the slots written so far, checks for stops every step and drops finished rows
    once a quarter of the batch has finished."""
    device, dtype, B = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype, len(prompts)
    P = max(len(p) for p in prompts)
    cache, logits, is_pad, position = prefill(model, prompts, P + max_new_tokens, pad_id)
    key_bias = None
    if bool(is_pad.any()):  # hide the prompts' pad slots from every later query
        hidden = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
        hidden[:, :P] = is_pad
        key_bias = hidden_key_bias(hidden, dtype)
    keys = row_keys(seeds, device)
    out = _Outputs(B, max_new_tokens, stop_ids, device)
    rows = torch.arange(B, device=device)  # original index of each row still in the batch
    alive = torch.ones(B, dtype=torch.bool, device=device)  # rows in the batch that have not stopped yet
    token, logp = _pick(logits, keys=keys, step=0, **sample)
    for t in range(max_new_tokens):
        if t > 0:
            token, logp = decode_one_token(model, token, position, P + t - 1, cache, key_bias, keys, t, **sample)
            position = position + 1
        alive = out.record(t, rows, alive, token, logp)
        n_alive = out.check(t, alive, on_step)
        if n_alive == 0:
            break
        if len(rows) - n_alive >= max(1, len(rows) // 4):  # drop finished rows
            keep = alive.nonzero().squeeze(-1)
            cache, rows, token, position, keys = (cache.select(keep), rows[keep], token[keep], position[keep],
                                                  keys[keep])
            key_bias = key_bias[keep] if key_bias is not None else None
            alive = alive[keep]
    return out.lists()


def _decode_compiled(model, prompts, seeds, max_new_tokens, stop_ids, pad_id, on_step, sample):
    """The compiled loop: static shapes (a kept cache, ``static_cache``; finished and spare rows keep decoding,
    masked), device-side slot and step counters, a stop check every ``STOP_CHECK_EVERY`` steps."""
    device, dtype, B = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype, len(prompts)
    P = max(len(p) for p in prompts)
    cache = static_cache(model, B, -(-(P + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET)
    rows = cache.batch_size
    spare = rows - B  # rows decoding a copy of the first prompt (prefilled once with it), never reported
    prompts, seeds = list(prompts) + [prompts[0]] * spare, list(seeds) + [0] * spare
    prompt_cache, logits, is_pad, position = prefill(model, prompts, P, pad_id)
    for dst, src in zip((*cache.k, *cache.v), (*prompt_cache.k, *prompt_cache.v)):
        dst[:, :, :P].copy_(src)
        dst[:, :, P:].zero_()  # no stale values from an earlier call (they are hidden anyway)
    del prompt_cache
    hidden = torch.zeros(rows, cache.max_len, dtype=torch.bool, device=device)
    hidden[:, :P] = is_pad
    key_bias = hidden_key_bias(hidden, dtype)  # always a tensor: one graph whether or not a prompt is padded
    keys = row_keys(seeds, device)
    step_fn = compiled_decode_one_token("reduce-overhead" if device.type == "cuda" else "default")
    # The temperature as a device tensor: one graph for rollouts (1.0) and Table 1 samples (0.7) of one geometry,
    # where a Python float would be a constant of the graph (the same float32 division either way).
    sample = dict(sample, temperature=torch.full((), sample["temperature"], dtype=torch.float32, device=device))
    out = _Outputs(rows, max_new_tokens, stop_ids, device)
    all_rows = torch.arange(rows, device=device)
    alive = all_rows < B
    slot = torch.full((), P - 1, dtype=torch.long, device=device)  # the previous token's cache slot
    step = torch.zeros((), dtype=torch.long, device=device)
    token, logp = _pick(logits, keys=keys, step=0, **sample)
    for t in range(max_new_tokens):
        if t > 0:
            slot, step = slot + 1, step + 1
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            token, logp = step_fn(model, token, position, slot, cache, key_bias, keys, step, **sample)
            token, logp = token.clone(), logp.clone()  # a CUDA graph's outputs are overwritten by its next replay
            position = position + 1
        alive = out.record(t, all_rows, alive, token, logp)
        if ((t + 1) % STOP_CHECK_EVERY == 0 or t == max_new_tokens - 1) and out.check(t, alive, on_step) == 0:
            break
    return out.lists()


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
