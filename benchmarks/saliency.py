"""Saliency mask optimisation: speed of our fast path against the plain transformers path, and steps versus quality.

    python benchmarks/saliency.py                  # both parts, SmolLM2-135M float32, ~400-token sequence, batch 1
    python benchmarks/saliency.py --part speed     # s/step ours vs plain (interleaved), max |p_ours - p_plain|
    python benchmarks/saliency.py --part quality   # Spearman rho of per-token saliency vs the 200-step result

speed: our ``saliency()`` and the plain implementation (``tests/test_saliency_plain.py``: transformers'
``LlamaForCausalLM`` with a 4D float mask that requires grad, full sequence, full LM head, weight gradients
computed) run the same input with the same config, one step of each in turn, so that load from other processes on
a shared machine hits both alike. Reports the median seconds per step of each, their ratio, and the max abs
difference of the mask parameters p after ``--parity-steps`` steps (goal: <= 1e-4).

quality: one 200-step run (the paper's setting) records the per-token saliency every 5 steps; then
- truncation: stop after t steps (same lr),
- the early-stop rule ``EarlyStop(every, rho)`` replayed on those snapshots (stop when the ranking moved less than
  rho over the last ``every`` steps),
- compressed schedules: t steps with lr scaled by 200/t (Adam moves an entry ~lr per step, so this keeps the
  distance an entry can travel, and the reward's scale, of the 200-step run),
each as Spearman rho against the 200-step saliency and time saved (200 / steps: every step costs the same).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the plain reference implementation lives with its tests

from atmanrl.model import load  # noqa: E402
from atmanrl.saliency import EarlyStop, SaliencyConfig, SaliencyInput, saliency  # noqa: E402
from atmanrl.saliency.optimize import spearman  # noqa: E402
from atmanrl.saliency.readout import column_means, normalised_mask, token_saliency  # noqa: E402

QUESTION = (
    "A baker makes 24 muffins in the morning and twice as many in the afternoon. She sells 50 muffins at the "
    "market and gives 10 to her neighbours. How many muffins does she have left? Think step by step, then write "
    "##### followed by the final answer."
)
COT = (
    "Let me think about this problem carefully, one step at a time, so that I do not make any mistakes along the "
    "way. First, I need to figure out how many muffins the baker makes in total during the whole day. In the "
    "morning she makes 24 muffins. That is the starting point of the problem, and it is given directly in the "
    "question. In the afternoon she makes twice as many muffins as in the morning. Twice as many means two times "
    "the morning amount. So in the afternoon she makes 2 * 24 = 48 muffins. Now I add the morning and the afternoon "
    "together to get the total for the day: 24 + 48 = 72 muffins. So the baker has 72 muffins before she sells or "
    "gives away any of them. Next, she sells 50 muffins at the market. Selling muffins means they leave her hands, "
    "so I subtract them: 72 - 50 = 22 muffins. After the market she still has 22 muffins. Then she gives 10 muffins "
    "to her neighbours, which is a very kind thing to do. Giving them away also means subtracting: 22 - 10 = 12 "
    "muffins. Everything adds up, so the number of muffins she has left at the end of the day is 12."
)
SHORT_COT = (
    "In the morning she makes 24 muffins. In the afternoon she makes twice as many, so 2 * 24 = 48 muffins. In "
    "total she makes 24 + 48 = 72 muffins. She sells 50, so 72 - 50 = 22 muffins are left. She gives 10 to her "
    "neighbours, so 22 - 10 = 12 muffins are left."
)
ANSWER = " 12"
# The example of docs/DESIGN.md, decision 4: the answer's number stated once among filler.
SECRET_QUESTION = "What is the secret number?"
SECRET_COT = (
    "Let me think. The weather is nice today and the garden is full of flowers. The secret number is 47. Birds are "
    "singing in the trees and the river flows slowly."
)
SECRET_ANSWER = " 47"


def example(tokenizer, cot: str = COT, question: str = QUESTION, answer: str = ANSWER) -> SaliencyInput:
    prompt = tokenizer.chat([{"role": "user", "content": question}])
    return SaliencyInput.from_parts(prompt, tokenizer.encode(" " + cot), tokenizer.encode(" #####"),
                                    tokenizer.encode(answer))


def log(msg: str):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def speed(model, x: SaliencyInput, steps: int) -> dict:
    from references import hf_twin, ours_as_dense, plain_mask_steps

    hf = hf_twin(model)
    config = SaliencyConfig(steps=steps, return_mask=True)
    ours_t, plain_t = [], []
    # Interleave: our step k, then plain step k (run inside our on_step hook), so both see the same machine load.
    plain_gen = _plain_stepper(hf, x, config, plain_mask_steps)
    clock = {"t": time.perf_counter()}

    def on_step(step, mask, losses):
        ours_t.append(time.perf_counter() - clock["t"])
        t0 = time.perf_counter()
        next(plain_gen)
        plain_t.append(time.perf_counter() - t0)
        log(f"step {step + 1}/{steps}: ours {ours_t[-1]:.2f}s plain {plain_t[-1]:.2f}s loss {losses[0].item():.4f}")
        clock["t"] = time.perf_counter()

    (result,) = saliency(model, [x], config, on_step=on_step)
    p_plain = next(plain_gen)
    p_ours = ours_as_dense(result.mask, x, config.init)
    delta = (p_ours - p_plain.double()).abs()[_entries(x)]  # over the mask's parameters only
    diff, within = delta.max().item(), (delta <= 1e-4).double().mean().item()
    # The first step of each pays one-off costs (allocator warm-up, transformers' mask checks): median of the rest.
    o, p = statistics.median(ours_t[1:]), statistics.median(plain_t[1:])
    return {"tokens": len(x.tokens), "prompt": x.prompt_len, "cot": x.n_cot, "answer": x.n_answer, "steps": steps,
            "ours_s_per_step": o, "plain_s_per_step": p, "ratio": p / o, "max_abs_p_diff": diff,
            "share_within_1e-4": within, "n_entries": delta.numel(), "p_ours": p_ours,
            "ours_all": ours_t, "plain_all": plain_t, "threads": torch.get_num_threads()}


def _entries(x: SaliencyInput) -> torch.Tensor:
    """(S, S) bool: the mask's parameters, causal rows w >= v of the CoT key columns v."""
    S, (cs, ce) = len(x.tokens), x.cot
    w, v = torch.arange(S)[:, None], torch.arange(S)[None, :]
    return (w >= v) & (v >= cs) & (v < ce)


def _plain_stepper(hf, x, config, plain_mask_steps):
    """Drive the plain loop one step at a time: it runs in a thread that pauses in its on_step hook. Yields None
    after each step, and finally p."""
    box = {}
    go, done = threading.Semaphore(0), threading.Semaphore(0)

    def hook(step):
        done.release()
        go.acquire()

    def target():
        box["p"], _ = plain_mask_steps(hf, x, config, config.steps, on_step=hook)
        done.release()

    threading.Thread(target=target, daemon=True).start()
    for _ in range(config.steps):
        done.acquire()  # one plain step finished
        yield None
        go.release()
    done.acquire()
    yield box["p"]


def quality(model, x: SaliencyInput, every: int = 5, compressed=(10, 20, 40)) -> dict:
    ref_steps = 200
    snaps, times = {}, []
    t0 = time.perf_counter()

    def on_step(step, mask, losses):
        times.append(time.perf_counter() - t0)
        if (step + 1) % every == 0 or step == 0:
            snaps[step + 1] = _saliency_of(mask)
        if (step + 1) % 20 == 0:
            log(f"reference step {step + 1}/{ref_steps}: loss {losses[0].item():.4f} ({times[-1]:.0f}s)")

    (ref,) = saliency(model, [x], SaliencyConfig(steps=ref_steps), on_step=on_step)
    final = ref.saliency
    out = {"tokens": len(x.tokens), "cot": x.n_cot, "reference_seconds": times[-1],
           "reference_s_per_step": times[-1] / ref_steps, "initial_loss": ref.initial_loss,
           "unmasked_loss": ref.unmasked_loss, "final_loss": ref.loss_curve[-1], "reward_reenable": ref.reward,
           "truncated": [], "early_stop": [], "compressed": []}
    for t, s in sorted(snaps.items()):
        out["truncated"].append({"steps": t, "rho": spearman(s, final), "time_saved": ref_steps / t})
    for rule in (EarlyStop(10, 0.99, 20), EarlyStop(10, 0.98, 20), EarlyStop(5, 0.99, 10), EarlyStop(20, 0.99, 20)):
        stop = _replay(rule, snaps, ref_steps)
        out["early_stop"].append({"every": rule.every, "rho_threshold": rule.rho, "min_steps": rule.min_steps,
                                  "steps": stop, "rho": spearman(snaps[stop], final), "time_saved": ref_steps / stop})
    for t in compressed:
        t0c = time.perf_counter()
        (r,) = saliency(model, [x], SaliencyConfig(steps=t, lr=1e-3 * ref_steps / t))
        elapsed = time.perf_counter() - t0c
        out["compressed"].append({"steps": t, "lr": 1e-3 * ref_steps / t, "rho": spearman(r.saliency, final),
                                  "time_saved": ref_steps / t, "seconds": elapsed, "reward_reenable": r.reward})
        log(f"compressed {t} steps: rho {out['compressed'][-1]['rho']:.3f}")
    top = torch.argsort(final, descending=True)[:8].tolist()
    out["reference_top8_cot_positions"] = top
    return out


def _saliency_of(mask) -> torch.Tensor:
    return token_saliency(column_means(normalised_mask(mask.sequence_p(0).detach(), mask.init))).cpu()


def _replay(rule: EarlyStop, snaps: dict, total: int) -> int:
    """The step at which EarlyStop(rule) would stop, from snapshots taken every 5 steps."""
    for t in range(rule.every, total + 1, rule.every):
        if t >= rule.min_steps and t - rule.every in snaps and t in snaps:
            if t - rule.every > 0 and spearman(snaps[t], snaps[t - rule.every]) >= rule.rho:
                return t
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["speed", "quality", "all"], default="all")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--parity-steps", type=int, default=20)
    parser.add_argument("--quality-cot", choices=["long", "short", "secret"], default="long",
                        help="sequence of the quality part: the ~400-token one of the speed part; 'short': the same "
                             "problem with a terse CoT (~200 tokens); 'secret': the 'secret number' "
                             "filler CoT of docs/DESIGN.md (~80 tokens), for when 200 reference steps on 400 tokens "
                             "take too long")
    parser.add_argument("--compressed", type=int, nargs="*", default=[10, 20, 40],
                        help="step counts of the compressed schedules")
    parser.add_argument("--threads", type=int, help="torch threads (on a machine shared with other jobs, 1 thread "
                                                    "avoids OpenMP spin-waiting; the quality part is timed in steps)")
    parser.add_argument("--skip-float64", action="store_true", help="speed part: skip the float64 same-mask check")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load(args.model, dtype=torch.float32)
    model.eval()
    x = example(tokenizer)
    log(f"sequence: {len(x.tokens)} tokens (prompt {x.prompt_len}, CoT {x.n_cot}, answer {x.n_answer}), "
        f"{torch.get_num_threads()} threads")
    report = {}
    if args.part in ("speed", "all"):
        s = report["speed"] = speed(model, x, args.parity_steps)
        p_ours = s.pop("p_ours")  # (S, S) tensor: kept out of the JSON report
        print(f"speed ({s['tokens']} tokens, batch 1, float32, {s['threads']} threads): ours "
              f"{s['ours_s_per_step']:.3f} s/step, plain transformers {s['plain_s_per_step']:.3f} s/step, ratio "
              f"{s['ratio']:.2f}x; max |p_ours - p_plain| after {s['steps']} steps = {s['max_abs_p_diff']:.2e}")
        print(f"  {s['share_within_1e-4']:.4%} of the {s['n_entries']} mask entries agree to 1e-4 "
              f"({'PASS' if s['max_abs_p_diff'] <= 1e-4 else 'FAIL'}: goal max <= 1e-4)")
        if not args.skip_float64:
            # The float32 noise floor: our own run in float32 against our own run in float64. In float32, Adam turns
            # gradient noise on entries whose true gradient is ~0 into lr-sized steps, so a few of the entries of
            # ANY two float32 implementations drift by 1-2 lr at ~400 tokens (benchmarks/README.md).
            from references import ours_as_dense

            log("control: our own optimiser in float64 ...")
            (r64,) = saliency(copy.deepcopy(model).double(), [x], SaliencyConfig(steps=args.parity_steps,
                                                                                  return_mask=True))
            floor = (ours_as_dense(r64.mask, x, SaliencyConfig().init) - p_ours).abs()[_entries(x)].max().item()
            report["speed"]["ours_float32_vs_float64"] = floor
            print(f"  control, ours float32 vs ours float64: max |dp| = {floor:.2e} (the float32 noise floor)")
    if args.part in ("quality", "all"):
        xq = {"long": x, "short": example(tokenizer, SHORT_COT),
              "secret": example(tokenizer, SECRET_COT, SECRET_QUESTION, SECRET_ANSWER)}[args.quality_cot]
        log(f"quality sequence: {len(xq.tokens)} tokens (prompt {xq.prompt_len}, CoT {xq.n_cot})")
        q = report["quality"] = quality(model, xq, compressed=args.compressed)
        print(f"quality ({q['tokens']} tokens, CoT {q['cot']}): 200-step reference {q['reference_seconds']:.0f}s ({q['reference_s_per_step']:.3f} s/step), "
              f"initial loss {q['initial_loss']:.4f}, unmasked {q['unmasked_loss']:.4f}, final {q['final_loss']:.4f}")
        print("schedule                      steps  time saved  spearman rho vs 200 steps")
        for row in q["truncated"]:
            if row["steps"] in (1, 5, 10, 20, 40, 50, 100, 150):
                print(f"truncated (lr 1e-3)          {row['steps']:5d}  {row['time_saved']:9.1f}x  {row['rho']:.3f}")
        for row in q["early_stop"]:
            print(f"early stop every {row['every']:2d} rho>={row['rho_threshold']:.2f} {row['steps']:5d}  "
                  f"{row['time_saved']:9.1f}x  {row['rho']:.3f}")
        for row in q["compressed"]:
            print(f"compressed (lr {row['lr']:.0e})         {row['steps']:5d}  {row['time_saved']:9.1f}x  "
                  f"{row['rho']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
