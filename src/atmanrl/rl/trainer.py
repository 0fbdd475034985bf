"""The AtManRL / GRPO training loop (paper sections 3.3-3.4), written to be read top to bottom.

``build_run`` does the set-up once (process group, run directory, model, task and problems, the reference and
inference copies, FSDP2 sharding, optimizer, resume) and returns a ``Run``; ``train`` is then the algorithm.
One update:
  1. take the next ``problems_per_update`` problems of the epoch's shuffled order; each rank takes a contiguous
     block of them (the global batch does not depend on the number of ranks);
  2. roll out G completions per problem with the inference copy of the policy, recording ``logp_old``;
  3. outcome reward, Eq. 4;
  4. saliency reward, Eq. 2-3 (an AtMan mask optimised per answered rollout, all of the rank's in one
     ``saliency`` call; skipped entirely when its weight is 0, which is the paper's baseline arm);
  5. total reward and group advantages, Eq. 5's baseline;
  6. ``ppo_epochs`` passes over the rollouts, each in ``num_minibatches`` optimizer steps: recompute log-probs,
     clipped objective (Eq. 5), backward, optional gradient clipping, AdamW step;
  7. one JSON line of metrics (metrics.jsonl, atmanrl/rl/metrics.py), an update line on rank 0, a checkpoint
     every N updates. Inside a long phase rank 0 also prints progress (atmanrl/progress.py).

The loop knows nothing about its task: a ``Task`` (atmanrl/rl/rollout.py) turns problems into prompts and judges
completions; ``data.task`` picks one from atmanrl/tasks/registry.py, or a caller passes its own.

Distributed notes (see also atmanrl/dist.py):
- Minibatch ``m`` holds the rollouts whose global index is ``m`` modulo ``num_minibatches`` (strided, so every
  minibatch sees every problem). Because each rank owns a contiguous block of rollouts whose length is a multiple
  of ``num_minibatches``, that is "local index ``m`` modulo ``num_minibatches``" on every rank: the same global
  minibatch for any world size.
- Each rank's loss is divided by the GLOBAL number of rollouts in the minibatch and FSDP sums gradients over
  ranks, so the gradient equals the single-process one (tests/test_distributed.py).
- Rollouts, the saliency masks and the held-out evaluation run on a plain, unsharded copy of the policy,
  refreshed (one all-gather) whenever the policy has changed; see dist.py for why generation does not go through
  the FSDP module.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from atmanrl import dist
from atmanrl.config import DTYPES, RunConfig
from atmanrl.eval.training_eval import append_heldout, evaluate_heldout
from atmanrl.model.generate import sequence_logprobs
from atmanrl.progress import Progress, hms
from atmanrl.rl import checkpointing, rundir
from atmanrl.rl.grpo import LossStats, group_advantages, grpo_loss, outcome_reward, total_reward
from atmanrl.rl.metrics import update_record
from atmanrl.rl.rollout import Rollout, rollout_update
from atmanrl.tasks import Task
from atmanrl.tasks.registry import load_eval_problems, load_problems, make_task, task_entry

# ---------------------------------------------------------------------------------------------------------------
# Set-up: the built run
# ---------------------------------------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled problem order of one epoch: a function of (seed, epoch) only, so a resume needs no state."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g).tolist()


def validate(cfg: RunConfig, world_size: int) -> None:
    """Shapes the loop relies on; each error says which key to change."""
    t, G = cfg.train, cfg.rollout.group_size
    task_entry(cfg.data.task)  # an unknown task fails here, before a model is loaded
    if t.problems_per_update % world_size:
        raise ValueError(f"train.problems_per_update={t.problems_per_update} must be a multiple of the number of "
                         f"processes ({world_size}): each rank rolls out whole groups")
    local = t.problems_per_update // world_size * G
    if local % t.num_minibatches:
        raise ValueError(f"each rank holds {local} rollouts (train.problems_per_update / processes x "
                         f"rollout.group_size), which must be a multiple of train.num_minibatches="
                         f"{t.num_minibatches}")


@dataclass
class Run:
    """Everything the loop needs, built once by ``build_run``."""

    cfg: RunConfig
    d: dist.DistInfo
    out: Path  # the run directory: config.json, metrics.jsonl, eval.jsonl, checkpoints/, policy/
    task: Task
    problems: list  # the training problems
    eval_problems: list | None  # the held-out draw (None when eval.every is 0)
    policy: torch.nn.Module  # the trained module (FSDP2-sharded under torchrun)
    inference: torch.nn.Module  # plain copy for rollouts, masks and evaluation (the policy itself when not sharded)
    reference: torch.nn.Module | None  # frozen initial policy for the optional KL term
    optimizer: torch.optim.Optimizer
    per_epoch: int  # updates per epoch
    total: int  # updates of the whole run
    start: int  # updates done before this call (a resume)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def my_problems(self, update: int) -> tuple[int, list[int]]:
        """(epoch, training-set indices of this rank's problems) of update ``update`` (0-based)."""
        P = self.cfg.train.problems_per_update
        epoch, k = divmod(update, self.per_epoch)
        batch = epoch_order(len(self.problems), self.cfg.data.seed, epoch)[k * P:(k + 1) * P]
        share = P // self.d.world_size
        return epoch, batch[self.d.rank * share:(self.d.rank + 1) * share]  # contiguous: rollout order = global

    def refresh_inference(self) -> None:
        """Copy the (sharded) policy's current weights into the inference copy; collective when sharded."""
        if self.inference is not self.policy:
            dist.gather_into(self.policy, self.inference)
        self.inference.eval()


def build_run(cfg: RunConfig, policy: torch.nn.Module | None = None, task: Task | None = None,
              problems: list | None = None, eval_problems: list | None = None) -> Run:
    """The set-up of ``train``, in order; each argument left None comes from the config."""
    d = dist.init()
    validate(cfg, d.world_size)
    out = rundir.prepare(cfg)  # lock out_dir; resume, overwrite or refuse an earlier run; write config.json
    torch.manual_seed(cfg.train.seed)

    # ---- problems, model, task ----------------------------------------------------------------------------
    if problems is None:
        problems = load_problems(cfg.data)
    per_epoch = len(problems) // cfg.train.problems_per_update
    if per_epoch == 0:
        raise ValueError(f"{len(problems)} training problems are fewer than train.problems_per_update="
                         f"{cfg.train.problems_per_update}; lower it or give more problems (data.path, "
                         f"data.synthetic_problems, data.max_problems)")
    if eval_problems is None and cfg.eval.every > 0:
        eval_problems = load_eval_problems(cfg.data, cfg.eval)
    if policy is None:
        from atmanrl.model import load

        policy, tokenizer = load(cfg.model.name_or_path, dtype=DTYPES[cfg.model.dtype])
        task = task or make_task(cfg.data.task, tokenizer)
    elif task is None:
        raise ValueError("train(policy=...) also needs task=...: the task knows the policy's tokenizer")

    # ---- the reference and inference copies, sharding, optimizer -----------------------------------------
    policy = policy.to(d.device)
    reference = None
    if cfg.grpo.kl_beta > 0:  # a frozen copy of the initial policy (the paper uses no KL term)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    inference = policy
    if d.initialized:
        mp_dtype = dist.mixed_precision_dtype(cfg.model.mixed_precision)
        inference = copy.deepcopy(policy).to(mp_dtype or next(policy.parameters()).dtype).requires_grad_(False)
    policy = dist.shard(policy, cfg.model.mixed_precision)
    optimizer = make_optimizer(cfg, policy)

    # ---- schedule and resume ------------------------------------------------------------------------------
    total = per_epoch * cfg.train.epochs
    if cfg.train.max_updates is not None:
        total = min(total, cfg.train.max_updates)
    start = resume(cfg, out / "checkpoints", policy, optimizer)
    if d.is_main:
        rundir.trim_logs(out, start)
    dist.log(f"training {total} updates ({per_epoch} per epoch) on {len(problems)} problems, "
             f"{d.world_size} process(es) on {d.device}; saliency weight {cfg.saliency.weight}")
    return Run(cfg, d, out, task, problems, eval_problems, policy, inference, reference, optimizer, per_epoch,
               total, start)


def resume(cfg: RunConfig, ckpt_root: Path, policy, optimizer) -> int:
    """Load the newest complete checkpoint into ``policy``/``optimizer`` when resuming; the updates it had done."""
    if not cfg.checkpoint.resume or (loaded := checkpointing.load_latest(ckpt_root, policy, optimizer)) is None:
        return 0
    path, state = loaded  # the newest checkpoint that loads (damaged ones are skipped with a warning)
    dist.log(f"resumed from {path} (update {state['update']})")
    return state["update"]


def make_optimizer(cfg: RunConfig, policy) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(policy.parameters(), lr=t.lr)
    return torch.optim.AdamW(policy.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


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

    Without ``policy``/``task``/``problems`` they come from the config (``model.name_or_path``, ``data.task``,
    ``data.path``). Tests pass tiny ones. ``on_update`` is called with every metrics record (rank 0).
    """
    run = build_run(cfg, policy, task, problems, eval_problems)
    G = cfg.rollout.group_size
    records, t_begin = [], time.perf_counter()
    if cfg.eval.every > 0 and run.start == 0:
        heldout_eval(run, 0)
    for update in range(run.start, run.total):
        epoch, mine = run.my_problems(update)

        # 1-2. Rollouts with the current policy; logp_old recorded by the generator.
        t0 = time.perf_counter()
        run.refresh_inference()
        # One generate call: progress counts its decode steps (at most max_new_tokens; it ends early when every
        # rollout has stopped) and the tokens they produced.
        with Progress("rollout", cfg.rollout.max_new_tokens, "decode steps (at most)") as progress:
            rollouts = rollout_update(run.inference, run.task, [run.problems[i] for i in mine], mine, group_size=G,
                                      max_new_tokens=cfg.rollout.max_new_tokens,
                                      temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                      seed=cfg.train.seed, update=update, device=run.d.device,
                                      on_step=lambda tokens: progress.advance(1, tokens=tokens))
            progress.finish()
        t_rollout = time.perf_counter() - t0

        # 3. Outcome reward (Eq. 4).
        correct = torch.tensor([r.score.correct for r in rollouts])
        for r, o in zip(rollouts, outcome_reward(correct).tolist()):
            r.outcome = o

        # 4. Saliency reward (Eq. 2-3), skipped for the baseline arm.
        t0 = time.perf_counter()
        if cfg.saliency.weight != 0:
            saliency_rewards(run.inference, rollouts, cfg, G)
        t_saliency = time.perf_counter() - t0

        # 5. Total reward and group advantages (Eq. 5's baseline); a group lives on one rank.
        rewards = total_reward(torch.tensor([r.outcome for r in rollouts], dtype=torch.float64),
                               torch.tensor([r.saliency for r in rollouts], dtype=torch.float64), cfg.saliency.weight)
        advantages, zero_var = group_advantages(rewards.view(-1, G), cfg.grpo.std_normalize)
        for r, tot, a in zip(rollouts, rewards.tolist(), advantages.flatten().tolist()):
            r.total, r.advantage = tot, a

        # 6. Policy update (Eq. 5): ppo_epochs passes, each in num_minibatches optimizer steps.
        t0 = time.perf_counter()
        losses, stats, grad_norms = policy_update(run, rollouts)
        t_update = time.perf_counter() - t0

        # 7. Metrics, progress, held-out evaluation, checkpoint.
        done = update + 1
        record = update_record(done, epoch, rollouts, zero_var, losses, stats, grad_norms,
                               {"time_rollout": t_rollout, "time_saliency": t_saliency, "time_update": t_update})
        records.append(record)
        if run.d.is_main:
            with (run.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            if on_update is not None:
                on_update(record)
        log_update(record, done - run.start, run.total - run.start, time.perf_counter() - t_begin, run.total)
        if cfg.eval.every > 0 and (done % cfg.eval.every == 0 or done == run.total):
            heldout_eval(run, done)
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == run.total:
            save_checkpoint(run, done)
        if cfg.checkpoint.stop_after is not None and done >= cfg.checkpoint.stop_after:
            dist.log(f"stopping after update {done} (checkpoint.stop_after)")
            rundir.release(run.out)
            return TrainResult(done, records, run.out, run.policy)

    if cfg.checkpoint.export and run.total > 0:
        export_policy(run)
    rundir.release(run.out)
    return TrainResult(run.total, records, run.out, run.policy)


# ---------------------------------------------------------------------------------------------------------------
# The steps of the loop
# ---------------------------------------------------------------------------------------------------------------


def saliency_rewards(model, rollouts: list[Rollout], cfg: RunConfig, G: int) -> None:
    """Eq. 2-3 for every rollout that wrote an answer; neutral (its group's mean) for those that did not.

    One ``saliency`` call for all of the rank's answered rollouts (the saliency module batches them by
    ``saliency.max_batch`` and computes each distinct prompt once). A rollout without an answer (truncated) or
    with a degenerate mask gets the mean saliency reward of its group's valid ones (0 if none), so that only its
    outcome moves its advantage (see atmanrl/rl/rollout.py).

    Which rollouts share a batch changes a reward only at float rounding (padding changes the matmul shapes), and
    a rank's batch depends on the number of ranks: with the saliency arm on, runs on different numbers of ranks
    agree up to rounding, not bit for bit (a resume still repeats exactly).
    """
    from atmanrl.saliency import saliency

    config = cfg.saliency  # a SaliencyConfig (extended by the reward weight, which saliency() does not read)
    todo = [r for r in rollouts if r.score.saliency_input is not None]
    results = []
    if todo:
        with Progress("saliency", len(todo), "sequences") as progress:
            # on_step runs after every optimiser step of a batch: a batch of B sequences has done B/steps of them
            results = saliency(model, [r.score.saliency_input for r in todo], config,
                               on_step=lambda step, mask, losses: progress.advance(len(losses) / config.steps))
    for r, res in zip(todo, results):
        r.saliency_result = res
        r.saliency = res.reward if res.ok else 0.0
    for g in range(0, len(rollouts), G):
        group = rollouts[g:g + G]
        valid = [r.saliency for r in group if r.saliency_result is not None and r.saliency_result.ok]
        neutral = sum(valid) / len(valid) if valid else 0.0
        for r in group:
            if r.saliency_result is None or not r.saliency_result.ok:
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


def policy_update(run: Run, rollouts: list[Rollout]) -> tuple[list[float], LossStats, list[float]]:
    """``ppo_epochs`` passes of ``num_minibatches`` AdamW steps over this rank's rollouts (Eq. 5).

    Returns the global loss of every optimizer step, the pooled ratio statistics (of the micro-batches that were
    computed) and the gradient norms. A micro-batch whose rollouts all have advantage 0 (zero-variance groups,
    e.g. every rollout truncated) contributes exactly 0 to the gradient and is skipped (with kl_beta 0).
    """
    cfg, policy, optimizer, pad_id = run.cfg, run.policy, run.optimizer, run.task.pad_id
    t, g = cfg.train, cfg.grpo
    device = next(policy.parameters()).device
    M, mb = t.num_minibatches, t.micro_batch_size
    global_count = t.problems_per_update * cfg.rollout.group_size // M  # rollouts per minibatch, all ranks
    ref_logp = reference_logprobs(run.reference, rollouts, cfg, pad_id) if run.reference is not None else None
    policy.train()
    losses, grad_norms, stats = [], [], LossStats()
    micro_batches = t.ppo_epochs * sum(math.ceil(len(range(m, len(rollouts), M)) / mb) for m in range(M))
    optimizer.zero_grad(set_to_none=True)  # nothing may leak in from the rollout/saliency phase
    with Progress("policy update", micro_batches, "micro-batches") as progress:
        for _ in range(t.ppo_epochs):
            for m in range(M):
                rows = list(range(m, len(rollouts), M))  # strided minibatch: see the module docstring
                step_loss = torch.zeros((), dtype=torch.float64)
                for s in range(0, len(rows), mb):
                    chunk = [rollouts[i] for i in rows[s:s + mb]]
                    if g.kl_beta == 0 and not _carries_signal(chunk):
                        progress.advance()
                        continue  # all advantages 0 on every rank: the gradient is exactly 0, skip the forward
                    logp, mask = sequence_logprobs(policy, [r.prompt for r in chunk], [r.completion for r in chunk],
                                                   temperature=cfg.rollout.temperature, pad_id=pad_id)
                    width = logp.shape[1]
                    logp_old = _pad([r.logp_old for r in chunk], width, device)
                    ref = _pad([ref_logp[i] for i in rows[s:s + mb]], width, device) if ref_logp is not None else None
                    adv = torch.tensor([r.advantage for r in chunk], device=device)
                    loss, st = grpo_loss(logp, logp_old, mask, adv, eps=g.eps, ratio=g.ratio, count=global_count,
                                         ref_logp=ref, kl_beta=g.kl_beta)
                    loss.backward()
                    step_loss += loss.detach().double().cpu()
                    stats = stats.add(st)
                    progress.advance(tokens=sum(len(r.completion) for r in chunk))
                losses.append(float(dist.all_reduce(step_loss)))
                grad_norm = optimizer_step(policy, optimizer, cfg, losses[-1],
                                           f"optimizer step {len(losses)} of this update")
                if grad_norm is not None:
                    grad_norms.append(grad_norm)
    return losses, stats, grad_norms


def optimizer_step(policy, optimizer, cfg: RunConfig, loss: float, where: str) -> float | None:
    """One optimizer step on the accumulated gradients; returns the global gradient norm when clipping.

    A non-finite loss or gradient stops the run here, before the step could write NaN into the weights."""
    for p in policy.parameters():  # skipped micro-batches: an exact zero, so AdamW still steps as usual
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = None
    if cfg.train.grad_clip is not None:  # the norm before clipping: what check_finite judges
        norm = float(dist.full_tensor(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip)))
    checkpointing.check_finite(loss, policy, where, grad_norm=norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def heldout_eval(run: Run, update: int) -> None:
    """The held-out evaluation after ``update`` updates, appended to eval.jsonl (collective)."""
    run.refresh_inference()
    max_new = run.cfg.eval.max_new_tokens or run.cfg.rollout.max_new_tokens
    append_heldout(run.out, update, evaluate_heldout(run.inference, run.task, run.eval_problems,
                                                     max_new_tokens=max_new))


def save_checkpoint(run: Run, done: int) -> None:
    checkpointing.save(run.ckpt_root, done, run.policy, run.optimizer,
                       {"epoch": done // run.per_epoch, "seed": run.cfg.data.seed, "position": done % run.per_epoch},
                       keep=run.cfg.checkpoint.keep)


def export_policy(run: Run) -> None:
    """The final policy as a Hugging Face safetensors directory (out_dir/policy), with the task's tokenizer."""
    run.refresh_inference()
    if run.d.is_main:
        path = checkpointing.export_hf(run.inference, run.out / "policy", getattr(run.task, "tokenizer", None))
        dist.log(f"exported the policy to {path} (Hugging Face safetensors)")
    dist.barrier()


def log_update(r: dict, done: int, todo: int, elapsed: float, total: int) -> None:
    """The update line on rank 0 (the full record is in metrics.jsonl)."""
    eta = elapsed / done * (todo - done) if done else math.nan
    dist.log(f"[update {r['update']}/{total} epoch {r['epoch']}] acc {r['accuracy']:.3f} "
             f"R_out {r['reward_outcome']:+.3f} R_sal {r['reward_saliency']:+.4f} len {r['completion_len']:.0f} "
             f"clip {r['clip_fraction']:.3f} zero-var {r['zero_variance_groups']}/{r['groups']} | "
             f"rollout {r['time_rollout']:.1f}s saliency {r['time_saliency']:.1f}s update {r['time_update']:.1f}s "
             f"| ETA {hms(eta)}")
