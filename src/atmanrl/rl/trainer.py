"""The AtManRL / GRPO training loop (paper sections 3.3-3.4), written to be read top to bottom.

One update:
  1. take the next ``problems_per_update`` problems of the epoch's shuffled order; each rank takes a contiguous
     block of them (the global batch does not depend on the number of ranks);
  2. roll out G completions per problem with the inference copy of the policy, recording ``logp_old``;
  3. outcome reward, Eq. 4;
  4. saliency reward, Eq. 2-3 (an AtMan mask optimised per rollout; skipped entirely when its weight is 0, which
     is the paper's baseline arm);
  5. total reward and group advantages, Eq. 5's baseline;
  6. ``ppo_epochs`` passes over the rollouts, each in ``num_minibatches`` optimizer steps: recompute log-probs,
     clipped objective (Eq. 5), backward, optional gradient clipping, AdamW step;
  7. one JSON line of metrics (metrics.jsonl), a progress line on rank 0, a checkpoint every N updates.

Distributed notes (see also atmanrl/dist.py):
- Minibatch ``m`` holds the rollouts whose global index is ``m`` modulo ``num_minibatches`` (strided, so every
  minibatch sees every problem). Because each rank owns a contiguous block of rollouts whose length is a multiple
  of ``num_minibatches``, that is "local index ``m`` modulo ``num_minibatches``" on every rank: the same global
  minibatch for any world size.
- Each rank's loss is divided by the GLOBAL number of rollouts in the minibatch and FSDP sums gradients over
  ranks, so the gradient equals the single-process one (tests/test_distributed.py).
- Rollouts and the saliency masks run on a plain, unsharded copy of the policy, refreshed (one all-gather) at the
  start of every update; see dist.py for why generation does not go through the FSDP module.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from atmanrl import dist
from atmanrl.config import RunConfig, to_dict
from atmanrl.model.generate import generate, sequence_logprobs
from atmanrl.rl import checkpointing
from atmanrl.rl.grpo import LossStats, group_advantages, grpo_loss, outcome_reward, total_reward
from atmanrl.rl.rollout import GSM8KTask, Rollout, Task, rollout_update

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------------------------
# Set-up: what to train on
# ---------------------------------------------------------------------------------------------------------------


def load_problems(path: str | None, n_synthetic: int, seed: int, max_problems: int | None = None) -> list:
    """GSM8K problems from a jsonl file, or the embedded synthetic GSM8K-style problems when ``path`` is None."""
    if path is None:
        from atmanrl.data.synthetic import make_problems

        problems = make_problems(n_synthetic, seed)
    else:
        from atmanrl.data.gsm8k import read_gsm8k

        problems = read_gsm8k(path)
    return problems[:max_problems] if max_problems is not None else problems


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled problem order of one epoch: a function of (seed, epoch) only, so a resume needs no state."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g).tolist()


def validate(cfg: RunConfig, world_size: int) -> None:
    """Shapes the loop relies on; each error says which key to change."""
    t, G = cfg.train, cfg.rollout.group_size
    if t.problems_per_update % world_size:
        raise ValueError(f"train.problems_per_update={t.problems_per_update} must be a multiple of the number of "
                         f"processes ({world_size}): each rank rolls out whole groups")
    local = t.problems_per_update // world_size * G
    if local % t.num_minibatches:
        raise ValueError(f"each rank holds {local} rollouts (train.problems_per_update / processes x "
                         f"rollout.group_size), which must be a multiple of train.num_minibatches="
                         f"{t.num_minibatches}")
    if G < 2:
        raise ValueError(f"rollout.group_size={G}: GRPO needs at least 2 rollouts per problem for a baseline")
    if cfg.grpo.kl_beta < 0:
        raise ValueError(f"grpo.kl_beta={cfg.grpo.kl_beta} must be >= 0 (0 switches the KL term off)")


@dataclass
class TrainResult:
    updates: int  # updates done in total (including those before a resume)
    metrics: list[dict]  # the records written by this call
    out_dir: Path
    policy: torch.nn.Module


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


def train(
    cfg: RunConfig,
    *,
    policy: torch.nn.Module | None = None,
    task: Task | None = None,
    problems: list | None = None,
    eval_problems: list | None = None,
    on_update: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train ``policy`` on ``problems`` with GRPO (+ the AtMan saliency reward when ``cfg.saliency.weight > 0``).

    Without ``policy``/``task``/``problems`` they come from the config (``model.name_or_path``, ``data.path``).
    Tests pass tiny ones. ``on_update`` is called with every metrics record (rank 0).
    """
    d = dist.init()
    validate(cfg, d.world_size)
    out = Path(cfg.out_dir)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    torch.manual_seed(cfg.train.seed)

    # ---- model, task, data --------------------------------------------------------------------------------
    if policy is None:
        from atmanrl.model import load

        policy, tokenizer = load(cfg.model.name_or_path, dtype=DTYPES[cfg.model.dtype])
        task = task or GSM8KTask(tokenizer)
    elif task is None:
        raise ValueError("train(policy=...) also needs task=...: the task knows the policy's tokenizer")
    if problems is None:
        problems = load_problems(cfg.data.path, cfg.data.synthetic_problems, cfg.data.seed, cfg.data.max_problems)
    if eval_problems is None and cfg.eval.every > 0:
        eval_problems = load_problems(cfg.eval.path, cfg.eval.problems, cfg.eval.seed)
        if len(eval_problems) > cfg.eval.problems:  # the paper: 500 test problems drawn with a fixed seed
            from atmanrl.data.gsm8k import draw_problems

            eval_problems = draw_problems(eval_problems, cfg.eval.problems, cfg.eval.seed)
    policy = policy.to(d.device)
    reference = None
    if cfg.grpo.kl_beta > 0:  # a frozen copy of the initial policy (the paper uses no KL term)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)

    # The inference copy: a plain module for rollouts and saliency masks (the policy itself when not sharded).
    mp_dtype = dist.mixed_precision_dtype(cfg.model.mixed_precision)
    sharded = d.initialized
    inference = copy.deepcopy(policy).to(mp_dtype or next(policy.parameters()).dtype) if sharded else policy
    if sharded:
        inference.requires_grad_(False)
    policy = dist.shard(policy, cfg.model.mixed_precision)
    optimizer = make_optimizer(cfg, policy)

    # ---- schedule and resume ------------------------------------------------------------------------------
    P, G = cfg.train.problems_per_update, cfg.rollout.group_size
    per_epoch = len(problems) // P
    if per_epoch == 0:
        raise ValueError(f"{len(problems)} training problems are fewer than train.problems_per_update={P}")
    total = per_epoch * cfg.train.epochs
    if cfg.train.max_updates is not None:
        total = min(total, cfg.train.max_updates)
    ckpt_root = out / "checkpoints"
    start = 0
    if cfg.checkpoint.resume and (path := checkpointing.latest(ckpt_root)) is not None:
        state = checkpointing.load(path, policy, optimizer)
        start = state["update"]
        dist.log(f"resumed from {path} (update {start})")
    dist.log(f"training {total} updates ({per_epoch} per epoch) on {len(problems)} problems, "
             f"{d.world_size} process(es) on {d.device}; saliency weight {cfg.saliency.weight}")

    records, t_begin, metrics_file = [], time.perf_counter(), out / "metrics.jsonl"
    if d.is_main:
        start_fresh_logs(out, start, ckpt_root)
    if cfg.eval.every > 0 and start == 0:
        gather_weights(policy, inference, sharded)
        write_eval(out, 0, evaluate(inference, task, eval_problems, cfg))
    for update in range(start, total):
        epoch, k = divmod(update, per_epoch)
        order = epoch_order(len(problems), cfg.data.seed, epoch)
        batch = order[k * P:(k + 1) * P]
        share = P // d.world_size
        mine = batch[d.rank * share:(d.rank + 1) * share]  # contiguous block: rollout order = global order

        # 1-2. Rollouts with the current policy; logp_old recorded by the generator.
        t0 = time.perf_counter()
        gather_weights(policy, inference, sharded)
        inference.eval()
        rollouts: list[Rollout] = rollout_update(
            inference, task, [problems[i] for i in mine], mine, group_size=G,
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, seed=cfg.train.seed, update=update, device=d.device)
        t_rollout = time.perf_counter() - t0

        # 3. Outcome reward (Eq. 4).
        correct = torch.tensor([r.score.correct for r in rollouts])
        for r, o in zip(rollouts, outcome_reward(correct).tolist()):
            r.outcome = o

        # 4. Saliency reward (Eq. 2-3), skipped for the baseline arm.
        t0 = time.perf_counter()
        if cfg.saliency.weight != 0:
            saliency_rewards(inference, rollouts, cfg, G)
        t_saliency = time.perf_counter() - t0

        # 5. Total reward and group advantages (Eq. 5's baseline); a group lives on one rank.
        rewards = total_reward(torch.tensor([r.outcome for r in rollouts], dtype=torch.float64),
                               torch.tensor([r.saliency for r in rollouts], dtype=torch.float64), cfg.saliency.weight)
        advantages, zero_var = group_advantages(rewards.view(-1, G), cfg.grpo.std_normalize)
        for r, tot, a in zip(rollouts, rewards.tolist(), advantages.flatten().tolist()):
            r.total, r.advantage = tot, a

        # 6. Policy update: ppo_epochs passes, each in num_minibatches optimizer steps.
        t0 = time.perf_counter()
        policy.train()
        ref_logp = reference_logprobs(reference, rollouts, cfg, task.pad_id) if reference is not None else None
        losses, stats, grad_norms = policy_update(policy, optimizer, rollouts, ref_logp, cfg, task.pad_id,
                                                  P * G // cfg.train.num_minibatches)
        t_update = time.perf_counter() - t0

        # 7. Metrics, progress, checkpoint.
        record = metrics_record(update + 1, epoch, rollouts, zero_var, losses, stats, grad_norms,
                                (t_rollout, t_saliency, t_update))
        if d.is_main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if on_update is not None:
                on_update(record)
        records.append(record)
        progress(record, update + 1 - start, total - start, time.perf_counter() - t_begin, total)
        done = update + 1
        if cfg.eval.every > 0 and (done % cfg.eval.every == 0 or done == total):
            gather_weights(policy, inference, sharded)
            write_eval(out, done, evaluate(inference, task, eval_problems, cfg))
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == total:
            checkpointing.save(ckpt_root, done, policy, optimizer,
                               {"epoch": done // per_epoch, "seed": cfg.data.seed, "position": done % per_epoch},
                               keep=cfg.checkpoint.keep)
        if cfg.checkpoint.stop_after is not None and done >= cfg.checkpoint.stop_after:
            dist.log(f"stopping after update {done} (checkpoint.stop_after)")
            return TrainResult(done, records, out, policy)

    if cfg.checkpoint.export and total > 0:
        gather_weights(policy, inference, sharded)
        if d.is_main:
            path = checkpointing.export_hf(inference, out / "policy", getattr(task, "tokenizer", None))
            dist.log(f"exported the policy to {path} (Hugging Face safetensors)")
        dist.barrier()
    return TrainResult(total, records, out, policy)


# ---------------------------------------------------------------------------------------------------------------
# The steps of the loop
# ---------------------------------------------------------------------------------------------------------------


def start_fresh_logs(out: Path, start: int, ckpt_root: Path) -> None:
    """Keep metrics/eval lines only up to the update we (re)start from, so a resumed run has no duplicate
    updates; a fresh run (start 0) also drops an earlier run's checkpoints, which a later resume would pick up."""
    for name in ("metrics.jsonl", "eval.jsonl"):
        f = out / name
        if f.is_file():
            keep = [line for line in f.read_text().splitlines() if line and json.loads(line)["update"] <= start]
            if name == "eval.jsonl" and start == 0:
                keep = []
            f.write_text("".join(line + "\n" for line in keep))
    if start == 0 and ckpt_root.is_dir():
        dist.log(f"fresh run: removing the earlier checkpoints in {ckpt_root}")
        shutil.rmtree(ckpt_root)


def make_optimizer(cfg: RunConfig, policy) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(policy.parameters(), lr=t.lr)
    return torch.optim.AdamW(policy.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def gather_weights(policy, inference, sharded: bool) -> None:
    """Refresh the inference copy from the (sharded) policy; nothing to do when they are the same module."""
    if sharded:
        dist.gather_into(policy, inference)


def saliency_rewards(model, rollouts: list[Rollout], cfg: RunConfig, G: int) -> None:
    """Eq. 2-3 for every rollout that wrote an answer; neutral (group mean) for those that did not.

    One ``saliency`` call for the whole update (batched as memory allows; each group's prompt computed once).
    """
    from atmanrl.saliency import SaliencyConfig, saliency

    s = cfg.saliency
    config = SaliencyConfig(init=s.init, scale=s.scale, steps=s.steps, lr=s.lr, betas=s.betas,
                            weight_decay=s.weight_decay, reward=s.reward, max_batch=s.max_batch)
    todo = [r for r in rollouts if r.score.saliency_input is not None]
    results = saliency(model, [r.score.saliency_input for r in todo], config) if todo else []
    for r, res in zip(todo, results):
        r.saliency = res.reward if res.ok else 0.0
        r.extra = {"saliency_status": res.status, "initial_loss": res.initial_loss,
                   "unmasked_loss": res.unmasked_loss, "saturated": res.saturated}
    for g in range(0, len(rollouts), G):
        group = rollouts[g:g + G]
        todo = [r for r in group if r.score.saliency_input is not None]
        scored = [r.saliency for r in todo if r.extra.get("saliency_status") == "ok"]
        neutral = sum(scored) / len(scored) if scored else 0.0
        for r in group:  # no answer (truncated) or a degenerate mask: neutral, see rl/rollout.py
            if r.extra.get("saliency_status") != "ok":
                r.saliency = neutral


@torch.no_grad()
def reference_logprobs(reference, rollouts: list[Rollout], cfg: RunConfig, pad_id: int) -> list[torch.Tensor]:
    """Per-rollout token log-probs under the frozen reference policy (for the optional KL term)."""
    out = []
    mb = cfg.train.micro_batch_size
    for s in range(0, len(rollouts), mb):
        chunk = rollouts[s:s + mb]
        logp, mask = sequence_logprobs(reference, [r.prompt for r in chunk], [r.completion for r in chunk],
                                       temperature=cfg.rollout.temperature, pad_id=pad_id)
        out += [row[: len(r.completion)] for row, r in zip(logp, chunk)]
    return out


def _pad(rows: list[list[float]] | list[torch.Tensor], width: int, device) -> torch.Tensor:
    t = torch.zeros(len(rows), width, dtype=torch.float32, device=device)
    for i, row in enumerate(rows):
        row = torch.as_tensor(row, dtype=torch.float32)
        t[i, : len(row)] = row
    return t


def _carries_signal(chunk: list[Rollout]) -> bool:
    """Does any rank's micro-batch at this position have a non-zero advantage? (Zero-variance groups have none.)

    Collective under FSDP: every rank must run the same forwards, so they all skip or none does."""
    local = torch.tensor([float(any(r.advantage != 0 for r in chunk))])
    return bool(dist.all_reduce(local, "max").item())


def _fill_missing_grads(policy) -> None:
    for p in policy.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def policy_update(policy, optimizer, rollouts: list[Rollout], ref_logp, cfg: RunConfig, pad_id: int,
                  global_count: int) -> tuple[list[float], LossStats, list[float]]:
    """``ppo_epochs`` passes of ``num_minibatches`` AdamW steps over this rank's rollouts (Eq. 5).

    Returns the global loss of every optimizer step, the pooled ratio statistics (of the micro-batches that were
    computed) and the gradient norms. A micro-batch whose rollouts all have advantage 0 (zero-variance groups,
    e.g. every rollout truncated) contributes exactly 0 to the gradient and is skipped (with kl_beta 0).
    """
    t, g = cfg.train, cfg.grpo
    device = next(policy.parameters()).device
    M = t.num_minibatches
    losses, grad_norms, stats = [], [], LossStats()
    optimizer.zero_grad(set_to_none=True)  # nothing may leak in from the rollout/saliency phase
    for _ in range(t.ppo_epochs):
        for m in range(M):
            rows = list(range(m, len(rollouts), M))  # strided minibatch: see the module docstring
            step_loss = torch.zeros((), dtype=torch.float64)
            for s in range(0, len(rows), t.micro_batch_size):
                chunk = [rollouts[i] for i in rows[s:s + t.micro_batch_size]]
                if g.kl_beta == 0 and not _carries_signal(chunk):
                    continue  # all advantages 0 on every rank: the gradient is exactly 0, skip the forward
                logp, mask = sequence_logprobs(policy, [r.prompt for r in chunk], [r.completion for r in chunk],
                                               temperature=cfg.rollout.temperature, pad_id=pad_id)
                width = logp.shape[1]
                logp_old = _pad([r.logp_old for r in chunk], width, device)
                ref = _pad([ref_logp[i] for i in rows[s:s + t.micro_batch_size]], width, device) \
                    if ref_logp is not None else None
                adv = torch.tensor([r.advantage for r in chunk], device=device)
                loss, st = grpo_loss(logp, logp_old, mask, adv, eps=g.eps, ratio=g.ratio, count=global_count,
                                     ref_logp=ref, kl_beta=g.kl_beta)
                loss.backward()
                step_loss += loss.detach().double().cpu()
                stats = stats.add(st)
            _fill_missing_grads(policy)  # skipped micro-batches: an exact zero, so AdamW still steps as usual
            if t.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), t.grad_clip)
                grad_norms.append(float(dist.full_tensor(norm)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(dist.all_reduce(step_loss)))
    return losses, stats, grad_norms


# ---------------------------------------------------------------------------------------------------------------
# Evaluation (Figure 2: accuracy and response length on held-out problems during training)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, task: Task, problems: list, cfg: RunConfig) -> dict:
    """Greedy completions of this rank's share of ``problems``; global accuracy and mean lengths."""
    d = dist.info()
    model.eval()
    mine = problems[d.rank::d.world_size]
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    sums = torch.zeros(4, dtype=torch.float64)  # n, correct, completion tokens, cot tokens
    for s in range(0, len(mine), 8):
        chunk = mine[s:s + 8]
        prompts = [task.prompt(p) for p in chunk]
        for p, prompt, c in zip(chunk, prompts, generate(model, prompts, max_new_tokens=max_new, greedy=True,
                                                         stop_ids=task.stop_ids, pad_id=task.pad_id)):
            score = task.score(p, prompt, c.tokens)
            sums += torch.tensor([1, score.correct, len(c.tokens), score.cot_tokens], dtype=torch.float64)
    n, correct, length, cot = dist.all_reduce(sums).tolist()
    return {"eval_accuracy": correct / max(n, 1), "eval_completion_len": length / max(n, 1),
            "eval_cot_len": cot / max(n, 1), "eval_problems": int(n)}


def write_eval(out: Path, update: int, result: dict) -> None:
    if dist.info().is_main:
        with (out / "eval.jsonl").open("a") as f:
            f.write(json.dumps({"update": update, **result}) + "\n")
        dist.log(f"[eval @ update {update}] accuracy {result['eval_accuracy']:.3f}, "
                 f"mean response {result['eval_completion_len']:.1f} tokens")


# ---------------------------------------------------------------------------------------------------------------
# Observability
# ---------------------------------------------------------------------------------------------------------------


def metrics_record(update: int, epoch: int, rollouts: list[Rollout], zero_var: torch.Tensor, losses, stats: LossStats,
                   grad_norms, times) -> dict:
    """One JSON-able dict per update, summed over ranks (rank-local sums, then one all-reduce)."""
    answered = [r for r in rollouts if r.score.has_answer]
    local = torch.tensor([
        len(rollouts), sum(r.outcome for r in rollouts), sum(r.saliency for r in rollouts),
        sum(r.total for r in rollouts), sum(r.score.correct for r in rollouts), len(answered),
        sum(r.score.cot_tokens for r in answered), sum(len(r.completion) for r in rollouts),
        sum(not r.finished for r in rollouts), float(zero_var.sum()), float(zero_var.numel()),
        stats.units, stats.clipped, stats.ratio_sum, stats.kl_sum,
        sum(bool(r.extra.get("saturated")) for r in rollouts),
    ], dtype=torch.float64)
    (n, outcome, sal, tot, correct, n_answered, cot, length, truncated, zv, groups, units, clipped, ratio_sum,
     kl, saturated) = dist.all_reduce(local).tolist()
    rmin = dist.all_reduce(torch.tensor([stats.ratio_min], dtype=torch.float64), "min").item()
    rmax = dist.all_reduce(torch.tensor([stats.ratio_max], dtype=torch.float64), "max").item()
    t = dist.all_reduce(torch.tensor(times, dtype=torch.float64), "max").tolist()  # the slowest rank sets the pace
    record = {
        "update": update, "epoch": epoch,
        "reward_outcome": outcome / n, "reward_saliency": sal / n, "reward_total": tot / n,
        "accuracy": correct / n, "answered": n_answered / n, "truncated": truncated / n,
        "cot_len": cot / max(n_answered, 1), "completion_len": length / n,
        "zero_variance_groups": int(zv), "groups": int(groups),
        "loss": sum(losses) / max(len(losses), 1), "losses": losses,  # the global loss of every optimizer step
        # ratio statistics are null when no micro-batch carried a gradient (every group zero-variance)
        "clip_fraction": clipped / max(units, 1), "ratio_mean": ratio_sum / units if units else None,
        "ratio_min": rmin if units else None, "ratio_max": rmax if units else None,
        "time_rollout": t[0], "time_saliency": t[1], "time_update": t[2],
        "tokens_per_s": length / max(t[0], 1e-9),
    }
    if kl:
        record["kl"] = kl / n
    if grad_norms:
        record["grad_norm"] = sum(grad_norms) / len(grad_norms)
    record["saliency_saturated"] = int(saturated)  # rollouts whose answer loss was ~0 before the mask moved
    return record


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def progress(r: dict, done: int, todo: int, elapsed: float, total: int) -> None:
    eta = elapsed / done * (todo - done) if done else math.nan
    dist.log(f"[update {r['update']}/{total} epoch {r['epoch']}] acc {r['accuracy']:.3f} "
             f"R_out {r['reward_outcome']:+.3f} R_sal {r['reward_saliency']:+.4f} len {r['completion_len']:.0f} "
             f"clip {r['clip_fraction']:.3f} zero-var {r['zero_variance_groups']}/{r['groups']} | "
             f"rollout {r['time_rollout']:.1f}s saliency {r['time_saliency']:.1f}s update {r['time_update']:.1f}s "
             f"| ETA {_hms(eta)}")
