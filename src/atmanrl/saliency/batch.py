"""The input of the saliency module, and the fast batched forward that evaluates Eq. 2 many times.

A saliency input is one token sequence ``prompt + CoT + "#####" + gold answer`` with the spans of its parts
(``SaliencyInput``). ``AnswerBatch`` lays a list of them out for repeated evaluation of the answer loss (Eq. 2)
under changing attention biases — 200 times per mask in the paper's setting — and is where the speed comes from:

- **The prompt prefix is computed once.** No AtMan mask entry touches a prompt row or a prompt column (the mask
  lives on CoT key columns, and rows before the CoT cannot see them), so the prompt's keys and values are the same
  at every step. They are computed once, without autograd, into a ``KVCache``; every step runs only the suffix
  (CoT, delimiter, answer) against that cache. Rollouts of one group share their prompt: it is computed once for
  the group and ``KVCache.select`` repeats it.
- **The LM head runs only where the loss is** (``logits_at``): the positions that predict gold answer tokens.
- **Sequences are batched.** Different prompts are left-padded into one prefix (their pad keys hidden with
  ``llama.hidden_key_bias``, rotary positions shifted so every token keeps its true position), suffixes are
  right-padded (a right pad key sits after every real query slot, so the causal mask already hides it). Padding
  changes no real number: one sequence alone and the same sequence in a batch give the same loss.
- **How many at once.** ``sequences_per_batch`` sizes a batch from the free GPU memory (an estimate of what one
  optimisation step keeps alive per sequence); the masks of a whole training update, many groups, then share one
  batch, and each distinct prompt is still computed once.

Slot layout of sequence ``b`` with prompt length ``P_b`` in a batch with longest prompt ``P``: prompt token ``i``
sits in cache slot ``P - P_b + i``; suffix token ``t`` (absolute position ``P_b + t``) is query ``t`` and key slot
``P + t``. ``row_offset``/``col_offset`` tell the mask (``atmanrl.saliency.mask``) where its block goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atmanrl.model.generate import check_tokens, left_pad
from atmanrl.model.llama import KVCache, Llama, hidden_key_bias


@dataclass(frozen=True)
class SaliencyInput:
    """One sequence ``prompt + CoT + "#####" + gold answer`` as token ids, with half-open spans of its parts.

    tokens: the whole sequence.
    prompt_len: tokens ``[0, prompt_len)`` are the prompt (shared by a group's rollouts, computed once).
    cot: ``(start, end)`` of the CoT tokens: the key columns the AtMan mask acts on.
    answer: ``(start, end)`` of the gold answer tokens whose cross-entropy is Eq. 2's loss.

    Required order: ``prompt_len <= cot[0] <= cot[1] <= answer[0] <= answer[1] <= len(tokens)``. Tokens between
    the CoT and the answer (the ``#####`` delimiter) and after the answer are neither masked nor scored. An empty CoT
    or an empty answer is allowed: ``saliency`` reports it as a degenerate result instead of failing.
    """

    tokens: tuple[int, ...]
    prompt_len: int
    cot: tuple[int, int]
    answer: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        object.__setattr__(self, "cot", (int(self.cot[0]), int(self.cot[1])))
        object.__setattr__(self, "answer", (int(self.answer[0]), int(self.answer[1])))
        order = (0, self.prompt_len, *self.cot, *self.answer, len(self.tokens))
        if any(a > b for a, b in zip(order, order[1:])):
            raise ValueError(
                f"SaliencyInput spans out of order: need 0 <= prompt_len <= cot[0] <= cot[1] <= answer[0] <= "
                f"answer[1] <= len(tokens), got prompt_len={self.prompt_len}, cot={self.cot}, "
                f"answer={self.answer}, len(tokens)={len(self.tokens)}. Spans are half-open (start, end) token "
                f"indices; SaliencyInput.from_parts builds them from the four token lists."
            )

    @classmethod
    def from_parts(
        cls, prompt: Sequence[int], cot: Sequence[int], delimiter: Sequence[int], answer: Sequence[int]
    ) -> "SaliencyInput":
        """Concatenate ``prompt + cot + delimiter + answer`` and record the spans."""
        p, c, d = len(prompt), len(cot), len(delimiter)
        return cls(
            tokens=(*prompt, *cot, *delimiter, *answer),
            prompt_len=p,
            cot=(p, p + c),
            answer=(p + c + d, p + c + d + len(answer)),
        )

    @property
    def n_cot(self) -> int:
        return self.cot[1] - self.cot[0]

    @property
    def n_answer(self) -> int:
        return self.answer[1] - self.answer[0]

    @property
    def mask_rows(self) -> int:
        """Rows of the AtMan mask: every query from the first CoT token to the end of the sequence."""
        return len(self.tokens) - self.cot[0]


def bytes_per_sequence(model: Llama, inputs: Sequence[SaliencyInput]) -> int:
    """Estimated memory one mask-optimisation step keeps alive per sequence of ``inputs`` (the longest one).

    Per layer: the activations autograd saves for the backward through the suffix (about ``8 hidden + 2 kv_dim +
    4 intermediate`` values per suffix token), the prefix keys/values copied for the step, their float32 copies when
    a bf16 model attends in the mask's float32 (``llama`` module docstring), and one float32 ``heads x suffix x
    keys`` attention matrix (the scores' gradient); plus float32 logits at every suffix position (generous: the LM
    head runs only at answer positions). ``benchmarks/gpu.py`` prints it next to the measured peak.
    """
    c = model.config
    e = model.embed_tokens.weight.element_size()
    P = max(x.prompt_len for x in inputs)
    T = max(len(x.tokens) - x.prompt_len for x in inputs)
    K = P + T
    kv = c.num_key_value_heads * c.head_dim
    per_layer = (T * (8 * c.hidden_size + 2 * kv + 4 * c.intermediate_size) * e  # saved activations
                 + 2 * K * kv * e  # this step's copy of the keys/values
                 + (2 * K * kv + T * c.num_attention_heads * c.head_dim) * 4  # float32 q, k, v
                 + c.num_attention_heads * T * K * 4)  # attention matrix / its gradient
    return c.num_hidden_layers * per_layer + T * c.vocab_size * 4


def sequences_per_batch(model: Llama, inputs: Sequence[SaliencyInput], memory_fraction: float = 0.8) -> int:
    """How many of ``inputs`` one mask-optimisation batch holds: all of them off CUDA; on CUDA as many as fit in
    ``memory_fraction`` of the free memory (the driver's free bytes plus what PyTorch's cache holds unused), at
    ``bytes_per_sequence`` each. An estimate, not a guarantee: ``SaliencyConfig.max_batch`` overrides it.
    """
    if not inputs:
        return 1
    device = model.embed_tokens.weight.device
    if device.type != "cuda":
        return len(inputs)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, min(len(inputs), int(memory_fraction * free) // bytes_per_sequence(model, inputs)))


class AnswerBatch:
    """A batch of ``SaliencyInput`` prepared for repeated answer-loss evaluations (see the module docstring).

    ``losses(attn_bias)`` returns Eq. 2 for every sequence: the mean cross-entropy of its gold answer tokens under
    teacher forcing, with ``attn_bias`` ``(B, 1, T, P + T)`` added to the attention scores of the suffix queries.
    Every input must have at least one CoT token and one answer token (``saliency`` filters degenerate inputs).
    """

    def __init__(self, model: Llama, inputs: Sequence[SaliencyInput]):
        if not inputs:
            raise ValueError("AnswerBatch needs at least one SaliencyInput")
        for i, x in enumerate(inputs):
            if x.n_cot == 0 or x.n_answer == 0:
                raise ValueError(
                    f"input {i} has {x.n_cot} CoT and {x.n_answer} answer tokens; AnswerBatch needs both "
                    f"non-empty (saliency() reports such inputs as degenerate instead of batching them)"
                )
        check_tokens(model, [x.tokens for x in inputs], "saliency input")
        self.model = model
        self.inputs = list(inputs)
        param = model.embed_tokens.weight
        self.device, self.dtype = param.device, param.dtype
        dev = self.device
        B = len(inputs)
        prompt_lens = [x.prompt_len for x in inputs]
        suffix_lens = [len(x.tokens) - x.prompt_len for x in inputs]
        P, T = max(prompt_lens), max(suffix_lens)
        self.B, self.P, self.T = B, P, T

        # Unique prompts: a GRPO group's rollouts share one prompt, computed once and repeated by KVCache.select.
        unique: dict[tuple[int, ...], int] = {}
        group = [unique.setdefault(x.tokens[: x.prompt_len], len(unique)) for x in inputs]
        self.group_index = torch.tensor(group, device=dev)
        self.n_prompts = len(unique)

        # Key-side bias shared by every step: hide the left-pad slots of each sequence's prompt.
        slots = torch.arange(P + T, device=dev)
        pad_slots = slots[None, :] < (P - torch.tensor(prompt_lens, device=dev))[:, None]  # (B, P + T)
        self.pad_bias = hidden_key_bias(pad_slots, self.dtype)  # (B, 1, 1, P + T)

        # The prefix, once, without autograd: keys/values of every unique prompt, left-padded to P.
        self.prefix_cache: KVCache | None = None
        if P > 0:
            prompts = list(unique)
            tokens, positions, key_pad = left_pad(prompts, 0, dev)  # (U, P) each
            bias = hidden_key_bias(key_pad, self.dtype)
            self.prefix_cache = KVCache(model.config, len(prompts), P + T, device=dev, dtype=self.dtype)
            only_first = torch.zeros(len(prompts), 1, dtype=torch.long, device=dev)  # logits unused: we want the cache
            with torch.no_grad():
                model(tokens, bias, positions=positions, cache=self.prefix_cache, logits_at=only_first)

        # The suffix, right-padded; rotary positions continue each sequence's own prompt.
        self.suffix = torch.zeros(B, T, dtype=torch.long, device=dev)
        for b, x in enumerate(inputs):
            self.suffix[b, : suffix_lens[b]] = torch.tensor(x.tokens[x.prompt_len:], device=dev)
        self.positions = torch.tensor(prompt_lens, device=dev)[:, None] + torch.arange(T, device=dev)[None, :]

        # Answer token n of sequence b is predicted by query a0 - 1 + n (suffix coordinates: minus P_b).
        K = max(x.n_answer for x in inputs)
        self.logits_at = torch.zeros(B, K, dtype=torch.long, device=dev)
        self.targets = torch.zeros(B, K, dtype=torch.long, device=dev)
        self.loss_dtype = torch.promote_types(self.dtype, torch.float32)  # CE in float32 even for a bf16 model
        self.weights = torch.zeros(B, K, dtype=self.loss_dtype, device=dev)  # 1/N on real answer tokens, 0 on pads
        for b, x in enumerate(inputs):
            a0, a1 = x.answer
            n = a1 - a0
            self.logits_at[b, :n] = torch.arange(a0 - 1, a1 - 1, device=dev) - x.prompt_len
            self.targets[b, :n] = torch.tensor(x.tokens[a0:a1], device=dev)
            self.weights[b, :n] = 1.0 / n

        # Where each sequence's AtMan block (rows and columns from its first CoT token) lands in attn_bias.
        self.row_offset = [x.cot[0] - x.prompt_len for x in inputs]
        self.col_offset = [P + x.cot[0] - x.prompt_len for x in inputs]

    @property
    def bias_shape(self) -> tuple[int, int]:
        """``(queries, keys)`` of the attention bias a step takes: ``(T, P + T)``."""
        return self.T, self.P + self.T

    def losses(self, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 2 per sequence, ``(B,)``: mean CE of the gold answer tokens under ``attn_bias``."""
        bias = self.pad_bias if attn_bias is None else self.pad_bias + attn_bias
        # A fresh copy of the prefix per call: the forward writes the suffix keys into it, and a new buffer keeps
        # each step's autograd graph separate from the last.
        cache = None if self.prefix_cache is None else self.prefix_cache.select(self.group_index)
        logits = self.model(
            self.suffix, bias, positions=self.positions, cache=cache, start_pos=self.P, logits_at=self.logits_at
        )
        logp = F.log_softmax(logits.to(self.loss_dtype), dim=-1).gather(-1, self.targets[..., None])[..., 0]  # (B, K)
        return -(logp * self.weights).sum(dim=1)
