"""GPU benchmark: decoding, saliency, bf16 checks and one trainer update, on random weights of Llama-3.2 shapes.

    python benchmarks/gpu.py --out runs/bench/gpu.json              # one GPU, Llama-3.2-3B shape, bf16 (< 5 min)
    python benchmarks/gpu.py --model 1b --sections decode saliency  # a subset
    python benchmarks/gpu.py --tiny --out /tmp/gpu_tiny.json        # a tiny model on the CPU, in seconds (CI)

Self-contained: no downloads (random weights of the real shapes; timings do not depend on the weight values), no
tokenizer (random token ids). Everything measured goes to stdout (Markdown tables) and to ``--out`` (JSON).

Sections (``--sections``, default all):
- ``decode``: greedy decoding tok/s at batch 1 / 8 / 64 (prompts of 90-110 tokens, left-padded; 128 new tokens,
  no stop): ours compiled (``generate(compile=True)``: static-shape step, CUDA graph), ours eager,
  ``transformers``' ``generate`` when importable, and the memory-bandwidth limit (weights + KV cache read once per
  step, at the card's bandwidth figure). Also: seconds of the first (compiling) call, graphs compiled by the timed
  call (must be 0: a recompiling step is the known trap), and whether compiled and eager decode the same tokens.
- ``saliency``: seconds per mask step at batch 8 / 64 (sequences of the paper's shape: prompt 92, CoT 291,
  delimiter 2, answer 3 tokens; groups of 8 share a prompt), per sequence-step, model FLOP/s and MFU against the
  card's dense bf16 peak, peak memory, and the batch ``max_batch=None`` would choose from free memory.
- ``bf16``: Spearman of per-token saliency, bf16 model vs the same weights in float32
  (``SaliencyConfig.compressed(20)``, 4 sequences); the first-pass importance ratio ``exp(logp - logp_old)``
  min/max under bf16 (sampler log-probs of 64 rollouts vs a training forward with autograd); the masked backward
  (float32 AtMan bias on the bf16 model) at many odd sequence lengths, each finite or the error it raised.
- ``update``: one trainer update of the paper's shape, 8 problems x 8 rollouts: rollout (one ``generate`` call,
  140 new tokens, sampled; times scaled to the paper's ~250), saliency (3 steps timed at the batch size
  ``max_batch=None`` picks, scaled to the paper's 200), policy update (2 passes x 2 minibatches of forward +
  backward + AdamW, bf16 weights and optimizer state); then the paper's 4,670 updates projected on 1 GPU and on
  8 GPUs (8 rollouts per GPU, from the batch-8 decode and saliency numbers; communication not included).

FLOP counts: a forward over ``n`` tokens is ``2 * n * (non-embedding parameters)`` plus attention
(``4 * layers * heads * head_dim * queries * keys``); a mask step is that forward plus a backward without weight
gradients (activation gradients only, about one more forward): ``2 x forward``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from atmanrl.model.generate import compile_count, generate, sequence_logprobs
from atmanrl.model.llama import Llama, LlamaConfig
from atmanrl.rl.grpo import grpo_loss
from atmanrl.saliency import AnswerBatch, AtManMask, SaliencyConfig, SaliencyInput, saliency
from atmanrl.saliency.batch import bytes_per_sequence, sequences_per_batch
from atmanrl.saliency.optimize import spearman

REPO = Path(__file__).resolve().parents[1]
PAPER_UPDATES = 4670  # 5 epochs of GSM8K train (7,473 problems) at 8 problems per update
PAPER_NEW_TOKENS = 250  # typical rollout length in the paper's run
PAPER_MASK_STEPS = 200

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


def build(shape: str, dtype, device) -> Llama:
    with torch.device(device):
        model = Llama(LlamaConfig(**SHAPES[shape]))
    model.init_weights(std=0.02, generator=torch.Generator(device).manual_seed(0))
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_ids(n: int, vocab: int, g: torch.Generator) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=g).tolist()


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

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


def bench_decode(model: Llama, args, fig: dict) -> list[dict]:
    device = model.embed_tokens.weight.device
    c = model.config
    g = torch.Generator().manual_seed(1)
    hf = None
    try:
        sys.path.insert(0, str(REPO / "tests"))
        from references import hf_twin

        hf = hf_twin(model)
    except ImportError as e:
        print(f"# transformers not importable ({e}): no transformers column", file=sys.stderr)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for B in args.decode_batches:
        lengths = torch.randint(args.prompt_len - 10, args.prompt_len + 11, (B,), generator=g).tolist()
        prompts = [random_ids(n, c.vocab_size, g) for n in lengths]
        N = args.new_tokens
        run = lambda compile, n=N: generate(model, prompts, max_new_tokens=n, greedy=True, compile=compile)
        row = {"batch": B, "new_tokens": N}
        run(False, 4)  # warm-up
        t, eager = timed(lambda: run(False), device)
        row["eager_tok_s"] = B * N / t
        if args.compiled:
            try:
                t_first, _ = timed(lambda: run(True), device)  # compiles (and records the CUDA graph)
                before = compile_count()
                t, static = timed(lambda: run(True), device)
            except Exception as e:  # a failed compile is a result to report, not the end of the run
                row["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            else:
                row.update(compiled_tok_s=B * N / t, first_call_s=t_first, recompiles=compile_count() - before)
                same = [a.tokens == b.tokens for a, b in zip(static, eager)]
                row["same_tokens_rows"] = f"{sum(same)}/{B}"
                row["max_logp_diff"] = max((abs(x - y) for a, b, ok in zip(static, eager, same) if ok
                                            for x, y in zip(a.logprobs, b.logprobs)), default=None)
        if hf is not None:
            P = max(lengths)
            ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)
            attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
            hf_run = lambda n=N: hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n,
                                             do_sample=False, eos_token_id=None, pad_token_id=0, top_p=None,
                                             top_k=None, temperature=None)
            with torch.inference_mode():
                hf_run(4)
                t, _ = timed(hf_run, device)
            row["transformers_tok_s"] = B * N / t
        if fig["bandwidth"]:
            kv_bytes = B * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * (args.prompt_len + N / 2) \
                * model.embed_tokens.weight.element_size()
            row["bandwidth_limit_tok_s"] = B * fig["bandwidth"] / (weight_bytes + kv_bytes)
            best = row.get("compiled_tok_s", row["eager_tok_s"])
            row["pct_of_limit"] = 100 * best / row["bandwidth_limit_tok_s"]
        if "transformers_tok_s" in row:
            row["x_transformers"] = row.get("compiled_tok_s", row["eager_tok_s"]) / row["transformers_tok_s"]
        rows.append(row)
        print(f"# decode batch {B}: {row}", file=sys.stderr, flush=True)
    del hf
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


def mask_step_seconds(model: Llama, inputs, steps: int, config: SaliencyConfig | None = None) -> float:
    """Median seconds per mask step over ``steps`` steps (after one warm-up step), all inputs in one batch."""
    device = model.embed_tokens.weight.device
    stamps = []

    def on_step(step, mask, losses):
        sync(device)
        stamps.append(time.perf_counter())

    config = config or SaliencyConfig(steps=steps + 1, max_batch=len(inputs))
    saliency(model, inputs, config, on_step=on_step)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def bench_saliency(model: Llama, args, fig: dict) -> list[dict]:
    device = model.embed_tokens.weight.device
    rows = []
    for B in args.saliency_batches:
        inputs = saliency_inputs(B, args.saliency_shape, model.config.vocab_size, seed=B)
        reset_peak(device)
        try:
            s = mask_step_seconds(model, inputs, args.saliency_steps)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"batch": B, "error": "out of memory", "auto_max_batch": sequences_per_batch(model, inputs)})
            print(f"# saliency batch {B}: out of memory", file=sys.stderr, flush=True)
            continue
        x = inputs[0]
        suffix, keys = len(x.tokens) - x.prompt_len, len(x.tokens)
        flops = 2 * B * forward_flops(model, suffix, keys)
        row = {"batch": B, "seq_len": len(x.tokens), "s_per_step": s, "s_per_sequence_step": s / B,
               "tflop_s": flops / s / 1e12, "peak_memory_gb": peak_memory_gb(device),
               "auto_max_batch": sequences_per_batch(model, inputs),
               "estimated_gb_per_sequence": bytes_per_sequence(model, inputs) / 1e9}
        if device.type == "cuda":  # measured: peak above the weights, per sequence (calibrates the estimate)
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            row["measured_gb_per_sequence"] = (row["peak_memory_gb"] - weights / 1e9) / B
        if fig["peak_bf16"]:
            row["mfu_pct"] = 100 * flops / s / fig["peak_bf16"]
        rows.append(row)
        print(f"# saliency batch {B}: {row}", file=sys.stderr, flush=True)
    return rows


def update_prompts(model: Llama, args, g: torch.Generator) -> list[list[int]]:
    """8 problems x 8 rollouts: 8 random prompts of ``prompt_len +- 10`` tokens, each repeated 8 times."""
    lengths = torch.randint(args.prompt_len - 10, args.prompt_len + 11, (8,), generator=g).tolist()
    prompts = [random_ids(n, model.config.vocab_size, g) for n in lengths]
    return [prompts[i // 8] for i in range(64)]


def bench_bf16(model: Llama, args) -> dict:
    device = model.embed_tokens.weight.device
    c = model.config
    out = {}
    # 1. Spearman of per-token saliency, bf16 vs float32 weights (the same values; one of them is `model`).
    other = build(args.model, torch.float32 if model.embed_tokens.weight.dtype == torch.bfloat16 else torch.bfloat16,
                  device)
    other.load_state_dict(model.state_dict())  # cast on copy
    bf16, f32 = (model, other) if other.embed_tokens.weight.dtype == torch.float32 else (other, model)
    inputs = saliency_inputs(args.bf16_sequences, args.saliency_shape, c.vocab_size, seed=7)
    config = SaliencyConfig.compressed(20)
    low, high = saliency(bf16, inputs, config), saliency(f32, inputs, config)
    out["saliency_spearman_bf16_vs_f32"] = [spearman(a.saliency, b.saliency) for a, b in zip(low, high)
                                            if a.ok and b.ok]
    out["initial_loss_bf16_f32"] = [(a.initial_loss, b.initial_loss) for a, b in zip(low, high)]
    out["reward_bf16_f32"] = [(a.reward, b.reward) for a, b in zip(low, high)]
    del other
    # 2. First-pass ratio: sampler log-probs vs a training forward (autograd on).
    g = torch.Generator().manual_seed(3)
    rows = update_prompts(model, args, g)  # the update's batch layout: the same compiled sampling step
    comps = generate(model, rows, max_new_tokens=args.ratio_new_tokens, temperature=1.0, seed=list(range(len(rows))))
    log_ratio = []  # logp (training forward) - logp_old (sampler), per completion token
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        for s in range(0, len(rows), args.micro_batch):
            chunk = comps[s:s + args.micro_batch]
            logp, mask = sequence_logprobs(model, rows[s:s + args.micro_batch], [x.tokens for x in chunk])
            old = torch.zeros_like(logp)
            for i, x in enumerate(chunk):
                old[i, : len(x.logprobs)] = torch.tensor(x.logprobs, device=device)
            log_ratio.append((logp.detach() - old)[mask])
        for p in model.parameters():
            p.requires_grad_(False)
    log_ratio = torch.cat(log_ratio).float()
    ratio = log_ratio.exp()
    out["first_pass_ratio_min"], out["first_pass_ratio_max"] = ratio.min().item(), ratio.max().item()
    out["first_pass_abs_log_ratio_mean"] = log_ratio.abs().mean().item()
    # 3. The masked backward at odd lengths (float32 AtMan bias on this model).
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
            lengths.append({"length": len(x.tokens), "ok": False, "error": str(e)[:300]})
    out["masked_backward"] = lengths
    print(f"# bf16: {out}", file=sys.stderr, flush=True)
    return out


def bench_update(model: Llama, args, decode_rows: list[dict], saliency_rows: list[dict]) -> dict:
    device = model.embed_tokens.weight.device
    c = model.config
    g = torch.Generator().manual_seed(5)
    rows = update_prompts(model, args, g)
    N = args.update_new_tokens
    out = {"rollouts": len(rows), "new_tokens": N}
    reset_peak(device)
    # Rollout: one generate call (as rl.rollout.rollout_update), sampled, no stop token (random weights).
    t, comps = timed(lambda: generate(model, rows, max_new_tokens=N, temperature=1.0, seed=list(range(len(rows)))),
                     device)
    out["rollout_s"] = t
    # Saliency: prompt + completion as CoT + delimiter + 3 answer tokens; steps timed, scaled to 200.
    inputs = [SaliencyInput.from_parts(p, x.tokens, random_ids(2, c.vocab_size, g), random_ids(3, c.vocab_size, g))
              for p, x in zip(rows, comps)]
    per_batch = sequences_per_batch(model, inputs)  # what max_batch=None picks
    batches = -(-len(inputs) // per_batch)
    s = mask_step_seconds(model, inputs, args.update_saliency_steps,
                          SaliencyConfig(steps=args.update_saliency_steps + 1))
    out["saliency_batches"] = batches
    out["saliency_s_per_step"] = s
    out["saliency_s_200_steps"] = s * batches * PAPER_MASK_STEPS
    # Policy update: 2 passes x 2 minibatches, micro-batches, forward + backward + AdamW (bf16 state).
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    adv = torch.randn(len(rows), generator=g).to(device)
    old = [torch.tensor(x.logprobs, device=device) for x in comps]

    def update():
        for _ in range(2):
            for m in range(2):
                idx = list(range(m, len(rows), 2))
                for s0 in range(0, len(idx), args.micro_batch):
                    chunk = idx[s0:s0 + args.micro_batch]
                    logp, mask = sequence_logprobs(model, [rows[i] for i in chunk], [comps[i].tokens for i in chunk])
                    logp_old = torch.zeros_like(logp)
                    for j, i in enumerate(chunk):
                        logp_old[j, : len(old[i])] = old[i]
                    loss, _ = grpo_loss(logp, logp_old, mask, adv[chunk], count=len(idx))
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    out["update_s"], _ = timed(update, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    del optimizer
    out["peak_memory_gb"] = peak_memory_gb(device)
    scale = PAPER_NEW_TOKENS / N
    per_update = out["rollout_s"] * scale + out["saliency_s_200_steps"] + out["update_s"] * scale
    out["paper_update_s_1gpu"] = per_update
    out["paper_run_hours_1gpu"] = per_update * PAPER_UPDATES / 3600
    # 8 GPUs: each rank decodes and explains 8 rollouts (the batch-8 rows) and updates on 1/8 of them.
    d8 = next((r for r in decode_rows if r["batch"] == 8), None)
    s8 = next((r for r in saliency_rows if r["batch"] == 8), None)
    if d8 and s8:
        tok_s = d8.get("compiled_tok_s", d8["eager_tok_s"])
        per_update_8 = 8 * PAPER_NEW_TOKENS / tok_s + s8["s_per_step"] * PAPER_MASK_STEPS + \
            out["update_s"] * scale / 8
        out["paper_update_s_8gpu"] = per_update_8
        out["paper_run_hours_8gpu"] = per_update_8 * PAPER_UPDATES / 3600
    print(f"# update: {out}", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, float32, small sizes (seconds)")
    ap.add_argument("--model", choices=["1b", "3b"], default="3b")
    ap.add_argument("--sections", nargs="+", default=["decode", "saliency", "bf16", "update"],
                    choices=["decode", "saliency", "bf16", "update"])
    ap.add_argument("--out", default="runs/bench/gpu.json")
    args = ap.parse_args(argv)
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.model, args.decode_batches, args.new_tokens, args.prompt_len = "tiny", [1, 8], 8, 20
        args.saliency_batches, args.saliency_shape, args.saliency_steps = [2, 8], (6, 12, 2, 3), 2
        args.bf16_sequences, args.ratio_new_tokens, args.odd_lengths = 2, 8, [7, 13, 31]
        args.update_new_tokens, args.update_saliency_steps, args.micro_batch = 6, 2, 16
        args.compiled = False  # inductor's CPU build of the step takes minutes; the tests cover the compiled path
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu.py needs a CUDA device (or --tiny for the CPU smoke run)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        args.decode_batches, args.new_tokens, args.prompt_len = [1, 8, 64], 128, 100
        args.saliency_batches, args.saliency_shape, args.saliency_steps = [8, 64], (92, 291, 2, 3), 5
        args.bf16_sequences, args.ratio_new_tokens = 4, 140
        args.odd_lengths = [5, 17, 33, 67, 131, 259, 387, 515, 1029]
        # Prompts of <= 110 tokens + 140 new tokens stay in one 256-slot cache bucket: the bf16 ratio check and
        # the update share one compiled sampling step at batch 64.
        args.update_new_tokens, args.update_saliency_steps, args.micro_batch = 140, 3, 8
        args.compiled = True
    fig = card(device)
    model = build(args.model, dtype, device)
    result = {"device": fig["name"], "model": args.model, "dtype": str(dtype), "torch": torch.__version__,
              "parameters": model.num_parameters, "card_bandwidth_bytes_s": fig["bandwidth"],
              "card_peak_bf16_flop_s": fig["peak_bf16"]}
    print(f"# gpu benchmark: {fig['name']}, Llama shape {args.model} ({model.num_parameters / 1e9:.2f}B), {dtype}, "
          f"torch {torch.__version__}")
    t0 = time.perf_counter()
    decode_rows, saliency_rows = [], []
    if "decode" in args.sections:
        decode_rows = result["decode"] = bench_decode(model, args, fig)
        print("\n## decode (greedy, tok/s)\n")
        print(md_table(decode_rows, ["batch", "compiled_tok_s", "eager_tok_s", "transformers_tok_s",
                                     "bandwidth_limit_tok_s", "pct_of_limit", "x_transformers", "first_call_s",
                                     "recompiles", "same_tokens_rows", "max_logp_diff", "compiled_error"]))
    if "saliency" in args.sections:
        saliency_rows = result["saliency"] = bench_saliency(model, args, fig)
        print("\n## saliency (mask optimisation)\n")
        print(md_table(saliency_rows, ["batch", "seq_len", "s_per_step", "s_per_sequence_step", "tflop_s", "mfu_pct",
                                       "peak_memory_gb", "auto_max_batch", "estimated_gb_per_sequence",
                                       "measured_gb_per_sequence", "error"]))
    if "bf16" in args.sections:
        result["bf16"] = bench_bf16(model, args)
        b = result["bf16"]
        print("\n## bf16\n")
        print(f"- per-token saliency Spearman, bf16 vs float32 weights: "
              f"{[round(r, 3) for r in b['saliency_spearman_bf16_vs_f32']]}")
        print(f"- first-pass ratio exp(logp - logp_old): min {b['first_pass_ratio_min']:.4f}, "
              f"max {b['first_pass_ratio_max']:.4f}, mean |log ratio| {b['first_pass_abs_log_ratio_mean']:.2e}")
        bad = [r for r in b["masked_backward"] if not r["ok"]]
        print(f"- masked backward at lengths {[r['length'] for r in b['masked_backward']]}: "
              f"{'all finite' if not bad else 'FAILED at ' + str(bad)}")
    if "update" in args.sections:
        result["update"] = u = bench_update(model, args, decode_rows, saliency_rows)
        print("\n## one trainer update (8 problems x 8 rollouts)\n")
        print(md_table([u], ["rollouts", "new_tokens", "rollout_s", "saliency_s_200_steps", "update_s",
                             "peak_memory_gb", "paper_update_s_1gpu", "paper_run_hours_1gpu", "paper_update_s_8gpu",
                             "paper_run_hours_8gpu"]))
    result["peak_memory_gb"] = peak_memory_gb(device)
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"\n# wrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
