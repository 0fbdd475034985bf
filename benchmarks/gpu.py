"""GPU benchmark on the paper run's own shapes: kernels, compiles, decoding, the mask optimisation, one trainer update.

    python benchmarks/gpu.py --quick --out runs/bench/gpu_quick.json   # < 8 min on one H100/H200, compiles included
    python benchmarks/gpu.py --out runs/bench/gpu.json                 # everything, Llama-3.2-3B shape, bf16
    python benchmarks/gpu.py --model 1b --sections decode saliency     # a subset, the 1B shape
    python benchmarks/gpu.py --tiny --out /tmp/gpu_tiny.json           # a tiny model on the CPU, seconds (CI)

Self-contained: random weights of the real shapes (timings do not depend on the weight values), random token ids,
no tokenizer, no download. Markdown tables on stdout, everything in ``--out`` (JSON).

The run's shapes (experiments/configs/paper_llama32_3b_atmanrl.yaml): GSM8K chat prompts of ~200 tokens, 8 problems
x 8 rollouts per update, up to 1024 new tokens (a static batch decodes until its longest row stops; random weights
never stop, so every timed decode runs the full 1024 steps: the rollout phase's upper bound), CoTs of ~190 tokens
(up to 1024), held-out evaluation at batch 8 (greedy), Table 1 at batch 64 (16 problems x k 4, temperature 0.7).

Sections (``--sections``, default all; in this order, ``--quick`` starts none after its time budget):
- ``kernels``: the attention kernel of each kind of call (padded prefill, compiled decode step, mask optimisation,
  training forward), recorded from one eager call of each: ``flex`` or SDPA's backend (``torch._fused_sdp_choice``).
- ``compile``: on a 4-layer cut of the model (compiling is what is checked, not speed), the trainer's and the
  evaluations' own functions in a run's order: rollout (``rollout_update``, 64 rows) -> held-out evaluation
  (``evaluate_heldout``: 8 rows, then a last chunk of 4) -> Table 1 (``tasks.sampling.sample`` with
  ``table1.evaluate``'s defaults: 64 rows, temperature 0.7) -> rollout -> evaluation -> rollout, each call's graphs
  compiled and CUDA graphs recorded (after the first rollout and evaluation both must stay 0), the kept caches,
  and the host syncs of one compiled rollout per token.
- ``decode``: the full model, sampled (the rollout's sampler), prompts ~200 tokens, 1024 new tokens (a 1280-slot
  cache): tok/s of the compiled step at batch 1 / 8 / 64 (``--quick``: 8 / 64), the first call's seconds (compile
  + record), graphs compiled by the timed call (must be 0), the memory-bandwidth limit (weights + the written part
  of the KV cache read once per step; flex skips the unwritten part), eager tok/s over the first tokens and
  whether compiled and eager decode the same tokens there.
- ``saliency``: seconds per mask step at CoT 190 and 800 tokens (prompt 200, ``#####`` 2, answer 3; groups of 8
  share a prompt), batch 8 and 64, on each attention kernel (``flex``, the ``sdpa`` reference, ``efficient``:
  the measurement that picks the kernel), with TFLOP/s, MFU against the card's dense bf16 peak, peak memory, and
  the batch ``max_batch=None`` picks with its per-sequence estimate next to the measured one. An out-of-memory or
  failing kernel is a row with its error, not the end of the run.
- ``update``: one paper update through the trainer's own functions (``rl.rollout.rollout_update``,
  ``rl.trainer.saliency_rewards`` and ``rl.trainer.policy_update``, imported, not copied) on the paper config:
  rollout (64 rows, 1024 steps), masks (timed at two step counts, extrapolated to the paper's 200), policy update
  (2 passes x 2 minibatches, micro-batch 2; completions cut to a typical 196 tokens, as a trained policy stops
  there), the first-pass importance ratio (sampler vs training forward), and the paper's 4,670 updates projected on
  1 and 8 GPUs (projected: communication not included).
- ``eval1``: Table 1's sampling for one batch (``tasks.sampling.sample`` with ``eval.table1.evaluate``'s
  defaults: 64 rows, k 4, temperature 0.7; 1024 tokens), and the GSM8K test set (1,319 problems) projected from it.
  The spaCy composition is CPU work, not timed.
- ``bf16``: Spearman of per-token saliency, bf16 model vs the same weights in float32 (``compressed(20)``); the
  masked backward (float32 AtMan bias on the bf16 model, on the chosen kernel) at odd lengths, each finite or its
  error.

FLOP counts: a forward over ``n`` tokens is ``2 * n * (non-embedding parameters)`` plus attention
(``4 * layers * heads * head_dim * queries * keys``); a mask step is that forward plus a backward without weight
gradients (activation gradients only, about one more forward): ``2 x forward``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

import atmanrl.model.generate as generate_module
import atmanrl.model.llama as llama_module
from atmanrl import dist
from atmanrl.config import load_config
from atmanrl.eval import table1
from atmanrl.eval.training_eval import evaluate_heldout
from atmanrl.model.generate import (
    compile_count,
    decode_one_token,
    generate,
    prefill,
    sequence_logprobs,
)
from atmanrl.model.llama import KVCache, Llama, LlamaConfig, hidden_key_bias
from atmanrl.rl.grpo import outcome_reward
from atmanrl.rl.rollout import rollout_update
from atmanrl.rl.trainer import Run, assign_advantages, make_optimizer, policy_update, saliency_rewards
from atmanrl.saliency import (
    AnswerBatch,
    AtManMask,
    SaliencyConfig,
    SaliencyInput,
    saliency,
)
from atmanrl.saliency.batch import bytes_per_sequence, sequences_per_batch
from atmanrl.saliency.optimize import spearman
from atmanrl.tasks import Score
from atmanrl.tasks.sampling import sample

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "experiments" / "configs" / "paper_llama32_3b_atmanrl.yaml"
PAPER_UPDATES = 4670  # 5 epochs of GSM8K train (7,473 problems) at 8 problems per update
PAPER_MASK_STEPS = 200
GSM8K_TEST = 1319  # Table 1's problems
QUICK_BUDGET_S = 420  # --quick starts no section after this many seconds (a section takes < 1 min once compiled)

LLAMA3_ROPE = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
               rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
               rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=True,
                 max_position_embeddings=2048),
}
# Vendor figures: (memory bandwidth in bytes/s, dense bf16 tensor-core peak in FLOP/s), matched against the name.
CARDS = [
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),  # SXM
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100", 1.555e12, 312e12),
    ("L40S", 0.864e12, 362e12),
]
SECTIONS = ["kernels", "compile", "decode", "saliency", "update", "eval1", "bf16"]


def settings(args) -> None:
    """The sizes of each mode: the paper's shapes on a GPU (``--quick``: fewer of them), small ones with ``--tiny``."""
    if args.tiny:
        args.model, args.prompt_len, args.new_tokens, args.rollout_rows, args.eval_rows = "tiny", 20, 12, 16, 4
        args.decode_batches, args.eager_tokens, args.cut_layers = [1, 8], 6, 1
        args.saliency_cases = [("flex", 2, 12), ("sdpa", 2, 12), ("efficient", 2, 12), ("auto", 8, 12),
                               ("auto", 2, 30)]
        args.saliency_steps, args.mask_step_counts, args.typical_cot, args.table1_rows = 2, (2, 8), 12, 16
        args.bf16_sequences, args.odd_lengths = 2, [7, 13, 31]
        return
    args.prompt_len, args.new_tokens, args.rollout_rows, args.eval_rows, args.cut_layers = 200, 1024, 64, 8, 4
    args.typical_cot, args.table1_rows = 190, 64
    args.decode_batches = [8, 64] if args.quick else [1, 8, 64]
    args.eager_tokens = 32 if args.quick else 64
    args.saliency_cases = [("flex", 8, 190), ("sdpa", 8, 190), ("efficient", 8, 190), ("auto", 64, 190),
                           ("auto", 8, 800)]
    if not args.quick:
        args.saliency_cases += [("auto", 64, 800), ("sdpa", 64, 190), ("efficient", 64, 190)]
    args.saliency_steps = 3 if args.quick else 5
    args.mask_step_counts = (2, 5) if args.quick else (3, 10)
    args.bf16_sequences = 2 if args.quick else 4
    args.odd_lengths = [131, 387, 1029] if args.quick else [5, 17, 33, 67, 131, 259, 387, 515, 1029]


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def card(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"name": "cpu", "bandwidth": None, "peak_bf16": None}
    name = torch.cuda.get_device_name(device)
    for key, bandwidth, peak in CARDS:
        if key.lower() in name.lower():
            return {"name": name, "bandwidth": bandwidth, "peak_bf16": peak}
    return {"name": name, "bandwidth": None, "peak_bf16": None}  # unknown card: limits are not reported


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def peak_memory_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def build(shape: str, dtype, device, layers: int | None = None) -> Llama:
    config = dict(SHAPES[shape])
    if layers is not None:
        config["num_hidden_layers"] = layers
    with torch.device(device):
        model = Llama(LlamaConfig(**config))
    model.init_weights(std=0.02, generator=torch.Generator(device).manual_seed(0))
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_ids(n: int, vocab: int, g: torch.Generator) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def group_prompts(model: Llama, rows: int, prompt_len: int, g: torch.Generator, group: int = 8) -> list[list[int]]:
    """``rows`` prompts, ``group`` rows per problem (one prompt each, ``prompt_len +- 15%`` tokens)."""
    spread = max(1, prompt_len * 15 // 100)
    lengths = torch.randint(prompt_len - spread, prompt_len + spread + 1, (-(-rows // group),), generator=g)
    problems = [random_ids(int(n), model.config.vocab_size, g) for n in lengths]
    return [problems[i // group] for i in range(rows)]


def non_embedding_params(model: Llama) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed_tokens"))


def forward_flops(model: Llama, queries: int, keys: int) -> float:
    """One sequence: ``queries`` tokens through every matrix, attending over ``keys`` keys (see module docstring)."""
    c = model.config
    return 2 * queries * non_embedding_params(model) + 4 * c.num_hidden_layers * c.num_attention_heads * \
        c.head_dim * queries * keys


def md_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


class CompileEvents:
    """Graphs compiled (``generate.compile_count``) and CUDA graphs recorded (torch._dynamo's compilation callbacks,
    trigger ``CUDAGRAPH_RECORDING``) since the last ``take()``."""

    def __init__(self):
        self.recorded = collections.Counter()
        handler = getattr(torch._dynamo, "callback_handler", None)
        self.available = handler is not None
        if self.available:
            handler.register_start_callback(lambda args: self.recorded.update([args.callback_trigger.name]))
        self.graphs, self.records = compile_count(), 0

    def take(self) -> dict:
        graphs, records = compile_count(), self.recorded["CUDAGRAPH_RECORDING"]
        out = {"graphs_compiled": graphs - self.graphs,
               "cudagraphs_recorded": records - self.records if self.available else None}
        self.graphs, self.records = graphs, records
        return out


def host_syncs(fn, device) -> int | None:
    """Host-device synchronisations during ``fn()`` (CUDA's sync debug mode, one warning per sync); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


def sdpa_backend(q, k, v, mask, causal: bool) -> str:
    choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, causal, enable_gqa=q.shape[1] != k.shape[1])
    names = {int(b.value): name for name, b in SDPBackend.__members__.items()}
    return names.get(int(choice), str(choice))


def kernel_label(q, k, v, mask) -> str:
    """What ``llama.attend`` runs for these arguments (see ``Attention`` in atmanrl/model/llama.py)."""
    if mask is None:
        return f"sdpa {sdpa_backend(q, k, v, None, q.shape[2] > 1)}, no mask, {q.dtype}"
    if mask.kernel == "flex":
        return f"flex ({'compiled' if q.is_cuda else 'eager'}), {q.dtype}, bias {getattr(mask.bias, 'dtype', None)}"
    if mask.kernel == "efficient":
        return f"sdpa EFFICIENT_ATTENTION (forced), K/V expanded, {q.dtype}"
    dtype = mask.dense.dtype
    return f"sdpa {sdpa_backend(q.to(dtype), k.to(dtype), v.to(dtype), mask.dense, False)}, dense mask, {dtype}"


def record_kernels(fn) -> list[str]:
    """Run ``fn`` with ``llama.attend`` wrapped to record the kernel of every attention call."""
    seen, original = [], llama_module.attend

    def recording(q, k, v, mask):
        seen.append(kernel_label(q, k, v, mask))
        return original(q, k, v, mask)

    llama_module.attend = recording
    try:
        fn()
    finally:
        llama_module.attend = original
    return sorted(set(seen))


def bench_kernels(model: Llama, args) -> list[dict]:
    device, c = model.embed_tokens.weight.device, model.config
    g = torch.Generator().manual_seed(11)
    prompts = group_prompts(model, 8, args.prompt_len, g, group=1)
    P = max(len(p) for p in prompts)
    slots = P + args.new_tokens

    def decode_step():
        cache = KVCache(c, len(prompts), slots, device=device, dtype=model.embed_tokens.weight.dtype)
        hidden = torch.zeros(len(prompts), slots, dtype=torch.bool, device=device)
        with torch.inference_mode():
            decode_one_token(model, torch.zeros(len(prompts), dtype=torch.long, device=device),
                             torch.full((len(prompts),), P, device=device), torch.tensor(P, device=device), cache,
                             hidden_key_bias(hidden, model.embed_tokens.weight.dtype),
                             generate_module.row_keys(range(len(prompts)), device), torch.tensor(1, device=device),
                             temperature=1.0, top_p=1.0, greedy=False)

    inputs = saliency_inputs(8, (args.prompt_len, args.typical_cot, 2, 3), c.vocab_size, seed=3)

    def mask_step():
        batch = AnswerBatch(model, inputs)
        mask = AtManMask([x.n_cot for x in inputs], [x.mask_rows for x in inputs], device=device)
        loss = batch.losses(mask(*batch.bias_shape, batch.row_offset, batch.col_offset)).sum()
        torch.autograd.grad(loss, [mask.p])

    def training_forward():
        completions = [random_ids(args.typical_cot, c.vocab_size, g) for _ in prompts]
        with torch.no_grad():
            sequence_logprobs(model, prompts, completions)

    calls = [("prefill, left-padded prompts (once per generate call)",
              lambda: torch.inference_mode()(prefill)(model, prompts, P, 0)),
             ("decode step, static cache (the compiled step)", decode_step),
             ("mask optimisation step (forward + backward into the mask)", mask_step),
             ("training forward (sequence_logprobs)", training_forward)]
    rows = []
    for name, fn in calls:
        try:
            rows.append({"call": name, "kernel": "; ".join(record_kernels(fn))})
        except Exception as e:  # a kernel that fails here is the finding
            rows.append({"call": name, "error": error_text(e)})
    print(f"# kernels: {rows}", file=sys.stderr, flush=True)
    return rows


def table1_defaults() -> dict:
    """``k``, ``temperature``, ``top_p`` and ``batch_size`` of ``eval.table1.evaluate`` (read from its signature)."""
    params = inspect.signature(table1.evaluate).parameters
    return {name: params[name].default for name in ("k", "temperature", "top_p", "batch_size")}


def bench_compile(model: Llama, args) -> list[dict]:
    """The trainer's and the evaluations' own calls in their order, on a cut of the model: graphs compiled and CUDA
    graphs recorded by each. Rollouts: ``rl.rollout.rollout_update`` (8 problems x 8); held-out evaluation:
    ``eval.training_eval.evaluate_heldout`` (greedy, 8 rows per call, here 1.5 calls' worth of problems, so its
    last call is a smaller chunk); Table 1: ``tasks.sampling.sample`` with ``eval.table1.evaluate``'s defaults."""
    device = model.embed_tokens.weight.device
    g = torch.Generator().manual_seed(5)
    task = RandomTask(model.config.vocab_size, args.typical_cot, seed=6)
    t1 = table1_defaults()
    n_problems = args.rollout_rows // 8

    def problems(n: int) -> list[list[int]]:
        return group_prompts(model, n, args.prompt_len, g, group=1)

    def rollout():
        return rollout_update(model, task, problems(n_problems), list(range(n_problems)), group_size=8,
                              max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, seed=0, update=0,
                              device=device)

    def heldout():
        return evaluate_heldout(model, task, problems(args.eval_rows * 3 // 2), max_new_tokens=args.new_tokens,
                                batch_size=args.eval_rows)

    def table1_batch():
        return sample(model, task, problems(args.table1_rows // t1["k"]), max_new_tokens=args.new_tokens, **t1)

    calls = {"rollout": rollout, "held-out eval": heldout, "Table 1 batch": table1_batch}
    events = CompileEvents()
    rows = []
    for name in ["rollout", "held-out eval", "Table 1 batch", "rollout", "held-out eval", "rollout"]:
        t, _ = timed(calls[name], device)
        rows.append({"call": name, "seconds": t, **events.take()})
        print(f"# compile: {rows[-1]}", file=sys.stderr, flush=True)
    caches = generate_module._static_caches.get(model, {}).values()
    rows[-1]["caches"] = ", ".join(sorted(f"{c.batch_size} x {c.max_len}" for c in caches))
    syncs = host_syncs(rollout, device)  # once more, counting host syncs
    rows[-1]["host_syncs_per_token"] = None if syncs is None else syncs / args.new_tokens
    return rows


def bench_decode(model: Llama, args, fig: dict) -> list[dict]:
    device, c = model.embed_tokens.weight.device, model.config
    g = torch.Generator().manual_seed(1)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    events = CompileEvents()
    rows = []
    for B in args.decode_batches:
        prompts = group_prompts(model, B, args.prompt_len, g, group=8)
        seeds = list(range(B))
        N = args.new_tokens

        def run(compile, n=N, prompts=prompts, seeds=seeds):
            return generate(model, prompts, max_new_tokens=n, temperature=1.0, seed=seeds, compile=compile)

        row = {"batch": B, "new_tokens": N}
        try:
            row["first_call_s"], _ = timed(lambda: run(True), device)  # compiles and records
            events.take()
            t, static = timed(lambda: run(True), device)
            cache = generate_module.static_cache(model, B, 1)
            row["cache"] = f"{cache.batch_size} x {cache.max_len}"
        except Exception as e:  # a failed compile is a result to report, not the end of the run
            row["compiled_error"] = error_text(e)
        else:
            row.update(compiled_tok_s=B * N / t, timed_call=events.take())
            n = args.eager_tokens
            t_eager, eager = timed(lambda: run(False, n), device)
            row["eager_tok_s_first_tokens"] = B * n / t_eager
            row["same_tokens_rows"] = f"{sum(a.tokens[:n] == b.tokens for a, b in zip(static, eager))}/{B}"
        if fig["bandwidth"]:
            filled = statistics.mean(map(len, prompts)) + N / 2  # slots read per step on average (flex skips rest)
            kv_bytes = B * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * filled * \
                model.embed_tokens.weight.element_size()
            row["bandwidth_limit_tok_s"] = B * fig["bandwidth"] / (weight_bytes + kv_bytes)
            if "compiled_tok_s" in row:
                row["pct_of_limit"] = 100 * row["compiled_tok_s"] / row["bandwidth_limit_tok_s"]
        rows.append(row)
        print(f"# decode batch {B}: {row}", file=sys.stderr, flush=True)
    return rows


def saliency_inputs(n: int, shape: tuple[int, int, int, int], vocab: int, seed: int) -> list[SaliencyInput]:
    """``n`` sequences of (prompt, CoT, delimiter, answer) lengths ``shape``; groups of 8 share a prompt."""
    g = torch.Generator().manual_seed(seed)
    p, cot, d, a = shape
    out, prompt = [], None
    for i in range(n):
        if i % 8 == 0:
            prompt = random_ids(p, vocab, g)
        out.append(SaliencyInput.from_parts(prompt, random_ids(cot, vocab, g), random_ids(d, vocab, g),
                                            random_ids(a, vocab, g)))
    return out


def mask_step_seconds(model: Llama, inputs, steps: int) -> float:
    """Median seconds per mask step over ``steps`` steps (after one warm-up step), all inputs in one batch."""
    device = model.embed_tokens.weight.device
    stamps = []

    def on_step(step, mask, losses):
        sync(device)
        stamps.append(time.perf_counter())

    saliency(model, inputs, SaliencyConfig(steps=steps + 1, max_batch=len(inputs)), on_step=on_step)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def bench_saliency(model: Llama, args, fig: dict) -> list[dict]:
    device = model.embed_tokens.weight.device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for kernel, B, cot in args.saliency_cases:
        inputs = saliency_inputs(B, (args.prompt_len, cot, 2, 3), model.config.vocab_size, seed=B + cot)
        x = inputs[0]
        row = {"kernel": kernel, "batch": B, "cot": cot, "seq_len": len(x.tokens),
               "auto_max_batch": sequences_per_batch(model, inputs),
               "estimated_gb_per_sequence": bytes_per_sequence(model, inputs) / 1e9}
        model.attention = kernel
        reset_peak(device)
        try:
            s = mask_step_seconds(model, inputs, args.saliency_steps)
        except Exception as e:  # out of memory, or a kernel that fails: a row with its error
            row["error"] = error_text(e)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            flops = 2 * B * forward_flops(model, len(x.tokens) - x.prompt_len, len(x.tokens))
            row.update(s_per_step=s, s_per_sequence_step=s / B, tflop_s=flops / s / 1e12,
                       peak_memory_gb=peak_memory_gb(device))
            if device.type == "cuda":  # measured: peak above the weights, per sequence (calibrates the estimate)
                row["measured_gb_per_sequence"] = (row["peak_memory_gb"] - weights / 1e9) / B
            if fig["peak_bf16"]:
                row["mfu_pct"] = 100 * flops / s / fig["peak_bf16"]
        finally:
            model.attention = "auto"
        rows.append(row)
        print(f"# saliency {kernel} batch {B} cot {cot}: {row}", file=sys.stderr, flush=True)
    return rows


class RandomTask:
    """The trainer's ``Task`` for random weights: a problem is its prompt's token ids; every completion "answers"
    after a typical CoT (``cot`` tokens; random weights never write ``#####``), so every rollout gets a mask, and
    is correct with probability 1/2 (seeded), so groups have non-zero advantages."""

    stop_ids: list[int] = []
    pad_id = 0

    def __init__(self, vocab: int, cot: int, seed: int):
        self.vocab, self.cot, self.g = vocab, cot, torch.Generator().manual_seed(seed)

    def prompt(self, problem) -> list[int]:
        return list(problem)

    def score(self, problem, prompt, completion) -> Score:
        cot = list(completion[: self.cot])
        tail = random_ids(5, self.vocab, self.g)  # "#####" (2 tokens) + a 3-token gold answer
        correct = bool(torch.rand((), generator=self.g) < 0.5)
        return Score(correct=correct, has_answer=True, cot_tokens=len(cot),
                     saliency_input=SaliencyInput.from_parts(prompt, cot, tail[:2], tail[2:]))


def timed_masks(model, rollouts, cfg, steps: int, device) -> float:
    """Seconds of the trainer's ``saliency_rewards`` with ``saliency.steps = steps``."""
    cfg.saliency.steps = steps
    t, _ = timed(lambda: saliency_rewards(model, rollouts, cfg, cfg.rollout.group_size), device)
    return t


def bench_update(model: Llama, args, decode_rows: list[dict], saliency_rows: list[dict]) -> dict:
    """One paper update through the trainer's functions (module docstring), and the run projected from it."""
    device = model.embed_tokens.weight.device
    n_problems = args.rollout_rows // 8
    cfg = load_config(PAPER_CONFIG, [f"rollout.max_new_tokens={args.new_tokens}",
                                     f"train.problems_per_update={n_problems}"])
    G = cfg.rollout.group_size
    g = torch.Generator().manual_seed(7)
    problems = [group_prompts(model, 1, args.prompt_len, g)[0] for _ in range(n_problems)]
    task = RandomTask(model.config.vocab_size, args.typical_cot, seed=8)
    out = {"rollouts": n_problems * G, "new_tokens": args.new_tokens, "completion_for_update": args.typical_cot + 6}
    reset_peak(device)
    # 1-2. Rollouts: the trainer's one generate call per update (every row runs the full new_tokens here).
    events = CompileEvents()
    out["rollout_s"], rollouts = timed(lambda: rollout_update(
        model, task, problems, list(range(n_problems)), group_size=G, max_new_tokens=args.new_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=0, update=0, device=device), device)
    out["rollout_compiles"] = events.take()
    n = out["completion_for_update"]
    for r in rollouts:  # a trained policy stops after its CoT, "#####", the answer and end of turn
        r.completion, r.logp_old = r.completion[:n], r.logp_old[:n]
    # 3. Outcome reward (Eq. 4); 4. masks at two step counts, extrapolated to the paper's 200 (setup excluded).
    for r, o in zip(rollouts, outcome_reward(torch.tensor([r.score.correct for r in rollouts])).tolist()):
        r.outcome = o
    k1, k2 = args.mask_step_counts
    timed_masks(model, rollouts[:8], cfg, 1, device)  # warm-up: compiles the mask kernel
    t1, t2 = (timed_masks(model, rollouts, cfg, k, device) for k in (k1, k2))
    out["saliency_s_per_step"] = (t2 - t1) / (k2 - k1)
    out["saliency_setup_s"] = t1 - k1 * out["saliency_s_per_step"]
    out["saliency_s_200_steps"] = out["saliency_setup_s"] + PAPER_MASK_STEPS * out["saliency_s_per_step"]
    out["saliency_batches"] = -(-len(rollouts) // sequences_per_batch(model, [r.score.saliency_input
                                                                              for r in rollouts]))
    # 5. Total reward, group advantages.
    assign_advantages(rollouts, cfg, G)
    # First pass: sampler log-probs (compiled decode, flex) vs the training forward (SDPA, flash) -- ratio ~1.
    with torch.no_grad():
        logp, mask = sequence_logprobs(model, [r.prompt for r in rollouts[:8]], [r.completion for r in rollouts[:8]],
                                       temperature=cfg.rollout.temperature)
    old = torch.zeros_like(logp)
    for i, r in enumerate(rollouts[:8]):
        old[i, : len(r.logp_old)] = torch.tensor(r.logp_old, device=device)
    ratio = (logp - old)[mask].float().exp()
    out["first_pass_ratio_min"], out["first_pass_ratio_max"] = ratio.min().item(), ratio.max().item()
    # 6. The policy update, as the trainer runs it (bf16 weights and AdamW state here: one GPU, no FSDP).
    model.requires_grad_(True)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, dist.info(), Path(tmp), task, problems, None, model, model, None,
                  make_optimizer(cfg, model), per_epoch=1, total=1, start=0)
        out["update_s"], _ = timed(lambda: policy_update(run, rollouts), device)
    model.requires_grad_(False).eval()
    out["peak_memory_gb"] = peak_memory_gb(device)
    out.update(projection(out, decode_rows, saliency_rows))
    print(f"# update: {out}", file=sys.stderr, flush=True)
    return out


def projection(u: dict, decode_rows: list[dict], saliency_rows: list[dict]) -> dict:
    """The paper's 4,670 updates on 1 GPU (this update) and on 8 (each rank draws, explains and trains on 8 of the
    64 rollouts: the batch-8 decode row, the batch-8 CoT-190 mask row, the policy update divided by 8). Projected:
    communication not included."""
    out = {"paper_update_s_1gpu": u["rollout_s"] + u["saliency_s_200_steps"] + u["update_s"]}
    out["paper_run_hours_1gpu"] = out["paper_update_s_1gpu"] * PAPER_UPDATES / 3600
    d8 = next((r for r in decode_rows if r["batch"] == 8 and "compiled_tok_s" in r), None)
    s8 = next((r for r in saliency_rows if r["kernel"] == "auto" and r["batch"] == 8 and r["cot"] == u[
        "completion_for_update"] - 6 and "s_per_step" in r), None)
    s8 = s8 or next((r for r in saliency_rows if r["batch"] == 8 and "s_per_step" in r and r["kernel"] in
                     ("auto", "flex")), None)
    if d8 and s8:
        out["paper_update_s_8gpu"] = 8 * d8["new_tokens"] / d8["compiled_tok_s"] + \
            s8["s_per_step"] * PAPER_MASK_STEPS + u["update_s"] / 8
        out["paper_run_hours_8gpu"] = out["paper_update_s_8gpu"] * PAPER_UPDATES / 3600
    return out


def bench_eval1(model: Llama, args) -> dict:
    """Table 1's sampling for one batch, as ``eval.table1.evaluate`` runs it (``tasks.sampling.sample`` with its
    defaults: k 4, temperature 0.7, 64 rows); scoring on the CPU and the spaCy composition are not timed."""
    device, t1 = model.embed_tokens.weight.device, table1_defaults()
    g = torch.Generator().manual_seed(9)
    problems = group_prompts(model, args.table1_rows // t1["k"], args.prompt_len, g, group=1)
    task = RandomTask(model.config.vocab_size, args.typical_cot, seed=10)
    events = CompileEvents()
    t, samples = timed(lambda: sample(model, task, problems, max_new_tokens=args.new_tokens, **t1), device)
    out = {"rows": len(samples), "problems": len(problems), "new_tokens": args.new_tokens, "seconds": t,
           "tok_s": sum(len(x.tokens) for x in samples) / t, **events.take()}
    out["gsm8k_test_hours_1gpu"] = t * -(-GSM8K_TEST // out["problems"]) / 3600
    print(f"# eval1: {out}", file=sys.stderr, flush=True)
    return out


def bench_bf16(model: Llama, args) -> dict:
    device, c = model.embed_tokens.weight.device, model.config
    out = {}
    # 1. Spearman of per-token saliency, bf16 vs float32 weights (the same values; one of them is `model`).
    other = build(args.model, torch.float32 if model.embed_tokens.weight.dtype == torch.bfloat16 else torch.bfloat16,
                  device)
    other.load_state_dict(model.state_dict())  # cast on copy
    bf16, f32 = (model, other) if other.embed_tokens.weight.dtype == torch.float32 else (other, model)
    inputs = saliency_inputs(args.bf16_sequences, (args.prompt_len, args.typical_cot, 2, 3), c.vocab_size, seed=7)
    config = SaliencyConfig.compressed(20)
    low, high = saliency(bf16, inputs, config), saliency(f32, inputs, config)
    out["saliency_spearman_bf16_vs_f32"] = [spearman(a.saliency, b.saliency) for a, b in zip(low, high)
                                            if a.ok and b.ok]
    del other
    # 2. The masked backward at odd lengths (float32 AtMan bias on this model, on the kernel auto picks).
    g = torch.Generator().manual_seed(3)
    lengths = []
    for n in args.odd_lengths:
        n_prompt = n // 4
        n_cot = max(1, n - n_prompt - 3)
        x = SaliencyInput.from_parts(random_ids(n_prompt, c.vocab_size, g), random_ids(n_cot, c.vocab_size, g),
                                     random_ids(1, c.vocab_size, g), random_ids(2, c.vocab_size, g))
        try:
            batch = AnswerBatch(model, [x])
            mask = AtManMask([x.n_cot], [x.mask_rows], -0.4, 10.0, device=device, dtype=torch.float32)
            loss = batch.losses(mask(*batch.bias_shape, batch.row_offset, batch.col_offset)).sum()
            (grad,) = torch.autograd.grad(loss, [mask.p])
            ok = bool(torch.isfinite(grad).all() and torch.isfinite(loss))
            lengths.append({"length": len(x.tokens), "ok": ok, "grad_abs_max": grad.abs().max().item()})
        except RuntimeError as e:  # e.g. a kernel's alignment error: reported, not hidden
            lengths.append({"length": len(x.tokens), "ok": False, "error": error_text(e)})
    out["masked_backward"] = lengths
    print(f"# bf16: {out}", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def aot_eager_step(on: bool):
    """CPU (``--tiny``): every ``generate`` call compiles its step, as on a GPU, under the aot_eager backend
    (dynamo graph capture, no code generation; inductor's C++ build takes minutes), as tests/test_generate.py
    does; restored on exit."""
    original, compile_on = generate_module.compiled_decode_one_token, generate_module.COMPILE_ON
    if on:
        compiled = torch.compile(decode_one_token, backend="aot_eager", fullgraph=True, dynamic=False)
        generate_module.compiled_decode_one_token = lambda mode: compiled
        generate_module.COMPILE_ON = {"cpu", "cuda"}  # the trainer's and evaluations' calls compile, as on a GPU
    try:
        yield
    finally:
        generate_module.compiled_decode_one_token, generate_module.COMPILE_ON = original, compile_on


def print_section(name: str, result) -> None:
    columns = {
        "kernels": ["call", "kernel", "error"],
        "compile": ["call", "seconds", "graphs_compiled", "cudagraphs_recorded", "caches", "host_syncs_per_token"],
        "decode": ["batch", "new_tokens", "cache", "compiled_tok_s", "bandwidth_limit_tok_s", "pct_of_limit",
                   "first_call_s", "timed_call", "eager_tok_s_first_tokens", "same_tokens_rows",
                   "compiled_error"],
        "saliency": ["kernel", "batch", "cot", "seq_len", "s_per_step", "s_per_sequence_step", "tflop_s", "mfu_pct",
                     "peak_memory_gb", "auto_max_batch", "estimated_gb_per_sequence", "measured_gb_per_sequence",
                     "error"],
        "update": ["rollouts", "new_tokens", "rollout_s", "saliency_s_per_step", "saliency_s_200_steps",
                   "update_s", "first_pass_ratio_min", "first_pass_ratio_max", "peak_memory_gb",
                   "paper_update_s_1gpu", "paper_run_hours_1gpu", "paper_update_s_8gpu", "paper_run_hours_8gpu"],
        "eval1": ["rows", "problems", "new_tokens", "seconds", "tok_s", "graphs_compiled", "gsm8k_test_hours_1gpu"],
    }
    print(f"\n## {name}\n")
    if name == "bf16":
        bad = [r for r in result["masked_backward"] if not r["ok"]]
        print(f"- per-token saliency Spearman, bf16 vs float32 weights: "
              f"{[round(r, 3) for r in result['saliency_spearman_bf16_vs_f32']]}")
        print(f"- masked backward at lengths {[r['length'] for r in result['masked_backward']]}: "
              f"{'all finite' if not bad else 'FAILED at ' + str(bad)}")
        return
    print(md_table(result if isinstance(result, list) else [result], columns[name]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, float32, small sizes (seconds)")
    ap.add_argument("--quick", action="store_true", help=f"fewer cases; no section starts after {QUICK_BUDGET_S} s")
    ap.add_argument("--model", choices=["1b", "3b"], default="3b")
    ap.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    ap.add_argument("--out", default="runs/bench/gpu.json")
    args = ap.parse_args(argv)
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device; on a CPU run it with --tiny", file=sys.stderr)
        sys.exit(2)
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    settings(args)
    with aot_eager_step(args.tiny):
        run_sections(args, device, dtype)


def run_sections(args, device, dtype) -> None:
    fig = card(device)
    model = build(args.model, dtype, device)
    result = {"device": fig["name"], "model": args.model, "dtype": str(dtype), "torch": torch.__version__,
              "mode": "tiny" if args.tiny else "quick" if args.quick else "full", "parameters": model.num_parameters,
              "card_bandwidth_bytes_s": fig["bandwidth"], "card_peak_bf16_flop_s": fig["peak_bf16"], "skipped": []}
    print(f"# gpu benchmark ({result['mode']}): {fig['name']}, Llama shape {args.model} "
          f"({model.num_parameters / 1e9:.2f}B), {dtype}, torch {torch.__version__}")
    t0 = time.perf_counter()
    for name in [s for s in SECTIONS if s in args.sections]:
        if args.quick and time.perf_counter() - t0 > QUICK_BUDGET_S:
            result["skipped"].append(name)
            print(f"\n## {name}\n\nskipped: --quick's {QUICK_BUDGET_S} s budget is spent")
            continue
        try:
            result[name] = run_section(name, model, args, fig, result, dtype)
        except Exception as e:  # a section that fails on this card is a finding; the others still run
            result[name] = {"error": error_text(e)}
            print(f"\n## {name}\n\nFAILED: {result[name]['error']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            print_section(name, result[name])
        result.setdefault("section_s", {})[name] = time.perf_counter() - t0
        write(args.out, result, t0, device)  # after every section: a run cut short still leaves its numbers
    write(args.out, result, t0, device)
    print(f"\n# wrote {args.out} ({result['wall_s']:.0f} s)")


def run_section(name: str, model: Llama, args, fig: dict, result: dict, dtype):
    if name == "kernels":
        return bench_kernels(model, args)
    if name == "compile":
        cut = build(args.model, dtype, model.embed_tokens.weight.device, layers=args.cut_layers)
        return bench_compile(cut, args)
    if name == "decode":
        return bench_decode(model, args, fig)
    if name == "saliency":
        return bench_saliency(model, args, fig)
    if name == "update":
        rows = {k: result[k] if isinstance(result.get(k), list) else [] for k in ("decode", "saliency")}
        return bench_update(model, args, rows["decode"], rows["saliency"])
    if name == "eval1":
        return bench_eval1(model, args)
    return bench_bf16(model, args)


def write(path: str, result: dict, t0: float, device) -> None:
    result["peak_memory_gb"] = peak_memory_gb(device)
    result["wall_s"] = time.perf_counter() - t0
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
