"""The AtManRL / GRPO training loop (paper sections 3.3-3.4), written to be read top to bottom.

``build_run`` does the set-up once (process group, problems, run directory, model and task, the reference and
inference copies, FSDP2 sharding, optimizer, resume) and returns a ``Run``; ``train`` is then the algorithm.
One update:
  1. take the next ``problems_per_update`` problems of the epoch's shuffled order;
  2. roll out G completions per problem with the inference copy of the policy, recording ``logp_old``; each rank
     draws a contiguous share of the update's rollouts (equal up to one), then they are gathered on every rank
     (the global batch does not depend on the number of ranks);
  3. outcome reward, Eq. 4;
  4. saliency reward, Eq. 2-3 (an AtMan mask optimised per answered rollout, each rank an equal share of them in
     one ``saliency`` call, the results gathered back; skipped entirely when its weight is 0, which is the
     paper's baseline arm);
  5. total reward and group advantages, Eq. 5's baseline;
  6. ``ppo_epochs`` passes over the rollouts, each in ``num_minibatches`` optimizer steps: recompute log-probs,
     clipped objective (Eq. 5), backward, optional gradient clipping, AdamW step;
  7. one JSON line of metrics (metrics.jsonl, atmanrl/rl/metrics.py), an update line on rank 0, a checkpoint
     every N updates. Inside a long phase rank 0 also prints progress (atmanrl/progress.py).

The loop knows nothing about its task: a ``Task`` (atmanrl/rl/rollout.py) turns problems into prompts and judges
completions; ``data.task`` picks one from atmanrl/tasks/registry.py, or a caller passes its own.

Distributed notes (see also atmanrl/dist.py):
- Every rank holds all of the update's rollouts after step 2 and computes the rewards and advantages of all
  groups (a group may have been drawn on two ranks), but trains on its own share only: the contiguous block of
  rollouts it drew (``dist.share``: equal up to one rollout), whatever ``problems_per_update`` and the number of
  ranks are (the paper's 64 rollouts on 48 GPUs: 1 or 2 per rank; more ranks than rollouts: some have none).
- Minibatch ``m`` holds the rollouts whose GLOBAL index is ``m`` modulo ``num_minibatches`` (strided, so every
  minibatch sees every problem); a rank trains on those of its share. So the minibatches are the same for any
  world size. FSDP2 needs every rank to run the same forwards: a rank with fewer micro-batches in a minibatch
  than another makes up the difference with forwards whose backward adds exactly 0 (``_zero_backward``).
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
from atmanrl.config import DTYPES, ConfigError, RunConfig
from atmanrl.eval.training_eval import append_heldout, evaluate_heldout
from atmanrl.model.generate import sequence_logprobs
from atmanrl.progress import Progress, hms
from atmanrl.rl import checkpointing, rundir
from atmanrl.rl.grpo import (
    LossStats,
    group_advantages,
    group_standardised_saliency,
    grpo_loss,
    outcome_reward,
    total_reward,
)
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


def validate(cfg: RunConfig) -> None:
    """Shapes the loop relies on; each error says which key to change.

    Nothing here depends on the number of processes: the rollouts are shared out over any number of ranks (see
    the module docstring)."""
    t, G = cfg.train, cfg.rollout.group_size
    task_entry(cfg.data.task)  # an unknown task fails here, before a model is loaded
    n = t.problems_per_update * G
    if n % t.num_minibatches:
        raise ValueError(f"an update's {n} rollouts (train.problems_per_update x rollout.group_size) must split "
                         f"into train.num_minibatches={t.num_minibatches} equal minibatches; change one of these "
                         f"keys")


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

    def batch(self, update: int) -> tuple[int, list[int]]:
        """(epoch, training-set indices of the problems) of update ``update`` (0-based); the same on every rank."""
        P = self.cfg.train.problems_per_update
        epoch, k = divmod(update, self.per_epoch)
        return epoch, epoch_order(len(self.problems), self.cfg.data.seed, epoch)[k * P:(k + 1) * P]

    @property
    def my_rows(self) -> range:
        """This rank's rollouts of every update (global indices, problem-major): its contiguous equal share."""
        return dist.share(self.cfg.train.problems_per_update * self.cfg.rollout.group_size)

    def refresh_inference(self) -> None:
        """Copy the (sharded) policy's current weights into the inference copy; collective when sharded."""
        if self.inference is not self.policy:
            dist.gather_into(self.policy, self.inference)
        self.inference.eval()


def build_run(cfg: RunConfig, policy: torch.nn.Module | None = None, task: Task | None = None,
              problems: list | None = None, eval_problems: list | None = None) -> Run:
    """The set-up of ``train``, in order; each argument left None comes from the config."""
    d = dist.init()
    validate(cfg)

    # ---- problems (a file that cannot be read stops the run before out_dir is touched), run directory ----------
    if problems is None:
        problems = reading("data.path", cfg.data.path, load_problems, cfg.data)
    per_epoch = len(problems) // cfg.train.problems_per_update
    if per_epoch == 0:
        raise ConfigError(f"{len(problems)} training problems are fewer than train.problems_per_update="
                          f"{cfg.train.problems_per_update}; lower it or give more problems (data.path, "
                          f"data.synthetic_problems, data.max_problems)")
    if eval_problems is None and cfg.eval.every > 0:
        eval_problems = reading("eval.path", cfg.eval.path, load_eval_problems, cfg.data, cfg.eval)
    out = rundir.prepare(cfg)  # lock out_dir; resume, overwrite or refuse an earlier run; write config.json
    torch.manual_seed(cfg.train.seed)

    # ---- model, task ----------------------------------------------------------------------------------------
    if policy is None:
        from atmanrl.model import load

        policy, tokenizer = reading("model.name_or_path", cfg.model.name_or_path, load, cfg.model.name_or_path,
                                    dtype=DTYPES[cfg.model.dtype])
        task = task or make_task(cfg.data.task, tokenizer)
    elif task is None:
        raise ValueError("train(policy=...) also needs task=...: the task knows the policy's tokenizer")
    check_lengths(cfg, policy)

    # ---- the reference and inference copies, sharding, optimizer -----------------------------------------
    policy = policy.to(d.device)
    policy.attention = cfg.model.attention  # copied into the reference and inference copies below
    reference = None
    if cfg.grpo.kl_beta > 0:  # a frozen copy of the initial policy (the paper uses no KL term)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    mp_dtype = dist.mixed_precision_dtype(cfg.model.mixed_precision)
    inference = dist.inference_copy(policy, mp_dtype) if d.initialized else policy
    policy = dist.shard(policy, mp_dtype)
    optimizer = make_optimizer(cfg, policy)

    # ---- schedule and resume ------------------------------------------------------------------------------
    total = per_epoch * cfg.train.epochs
    if cfg.train.max_updates is not None:
        total = min(total, cfg.train.max_updates)
    start = resume(cfg, out / "checkpoints", policy, optimizer)
    if start >= total and start > 0:
        dist.log(f"nothing to train: the checkpoint is at update {start}, at or past this run's last update {total} "
                 "(train.max_updates, train.epochs); raise them to continue the run")
    if d.is_main:
        rundir.trim_logs(out, start)
    dist.log(f"training {total} updates ({per_epoch} per epoch) on {len(problems)} problems, "
             f"{d.world_size} process(es) on {d.device}; saliency weight {cfg.saliency.weight}")
    return Run(cfg, d, out, task, problems, eval_problems, policy, inference, reference, optimizer, per_epoch,
               total, start)


def resume(cfg: RunConfig, ckpt_root: Path, policy, optimizer) -> int:
    """Load the newest complete checkpoint into ``policy``/``optimizer`` when resuming; the updates it had done.

    The optimizer's settings are the config's, not the checkpoint's: a changed ``train.lr`` (``betas``,
    ``weight_decay``) applies from the next update, and the log says so. Without a checkpoint, the starting model
    must hold finite weights (a checkpoint's are checked when it loads)."""
    if not cfg.checkpoint.resume or (loaded := checkpointing.load_latest(ckpt_root, policy, optimizer)) is None:
        checkpointing.require_finite(policy, f"the starting model (model.name_or_path={cfg.model.name_or_path})")
        return 0
    path, state = loaded  # the newest checkpoint that loads (damaged ones are skipped with a warning)
    changed = checkpointing.apply_settings(optimizer, optimizer_settings(cfg))
    dist.log(f"resumed from {path} (update {state['update']})" + "".join(
        f"; train.{k} {a} -> {b} applied to the restored optimizer" for k, (a, b) in changed.items()))
    return state["update"]


def optimizer_settings(cfg: RunConfig) -> dict:
    """The optimizer's settings that the config decides (also applied after a resume)."""
    t = cfg.train
    return {"lr": t.lr} if t.optimizer == "sgd" else {"lr": t.lr, "betas": t.betas, "weight_decay": t.weight_decay}


def make_optimizer(cfg: RunConfig, policy) -> torch.optim.Optimizer:
    kind = torch.optim.SGD if cfg.train.optimizer == "sgd" else torch.optim.AdamW
    return kind(policy.parameters(), **optimizer_settings(cfg))


def reading(key: str, value, load: Callable, *args, **kwargs):
    """``load(*args, **kwargs)``, with a file that cannot be read (missing, damaged, not UTF-8, a directory) as a
    ``ConfigError`` naming the config key: the loaders' own sentences say what is wrong with the file."""
    try:
        return load(*args, **kwargs)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={value}: {e}") from None


def check_lengths(cfg: RunConfig, policy) -> None:
    """Generation lengths within the model's context (``max_position_embeddings``), before any rollout."""
    limit = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
    for key, value in (("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
                       ("eval.max_new_tokens", cfg.eval.max_new_tokens if cfg.eval.every > 0 else None)):
        if limit is not None and value is not None and value >= limit:
            raise ConfigError(f"{key}={value} leaves no room for the prompt in the model's context of {limit} "
                              f"positions (max_position_embeddings of {cfg.model.name_or_path}); lower it")


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
        epoch, batch = run.batch(update)

        # 1-2. Rollouts with the current policy; logp_old recorded by the generator. This rank draws its rows,
        # then every rank holds all of them (problem-major, as one process would have drawn them).
        t0 = time.perf_counter()
        run.refresh_inference()
        # One generate call: progress counts its decode steps (at most max_new_tokens; it ends early when every
        # rollout has stopped) and the tokens they produced.
        with Progress("rollout", cfg.rollout.max_new_tokens, "decode steps (at most)") as progress:
            drawn = rollout_update(run.inference, run.task, [run.problems[i] for i in batch], batch, group_size=G,
                                    max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                    top_p=cfg.rollout.top_p, seed=cfg.train.seed, update=update, device=run.d.device,
                                    rows=run.my_rows, on_step=lambda tokens: progress.advance(1, tokens=tokens))
            progress.finish()
        rollouts = dist.all_gather_list(drawn)
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

        # 5. Total reward and group advantages (Eq. 5's baseline), of every group on every rank.
        zero_var = assign_advantages(rollouts, cfg, G)

        # 6. Policy update (Eq. 5): ppo_epochs passes, each in num_minibatches optimizer steps.
        t0 = time.perf_counter()
        mine = rollouts[run.my_rows.start:run.my_rows.stop]
        losses, stats, grad_norms = policy_update(run, mine)
        t_update = time.perf_counter() - t0

        # 7. Metrics, progress, held-out evaluation, checkpoint.
        done = update + 1
        owned = zero_var[[g for g in range(len(zero_var)) if g * G in run.my_rows]]  # groups starting here
        record = update_record(done, epoch, mine, owned, losses, stats, grad_norms,
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


def assign_advantages(rollouts: list[Rollout], cfg: RunConfig, G: int) -> torch.Tensor:
    """``R_total`` and the group advantage of every rollout (Eq. 4 + 3, then Eq. 5's baseline), set on the rollouts;
    returns the zero-variance flag of each group. With ``saliency.normalize: group`` (ours, off by default) the
    saliency term is standardised inside its group before it is weighted."""
    sal = torch.tensor([r.saliency_reward for r in rollouts], dtype=torch.float64)
    if cfg.saliency.normalize == "group":
        sal = group_standardised_saliency(sal.view(-1, G)).flatten()
    rewards = total_reward(torch.tensor([r.outcome for r in rollouts], dtype=torch.float64), sal, cfg.saliency.weight)
    advantages, zero_var = group_advantages(rewards.view(-1, G), cfg.grpo.std_normalize)
    for r, tot, a in zip(rollouts, rewards.tolist(), advantages.flatten().tolist()):
        r.total, r.advantage = tot, a
    return zero_var


def saliency_rewards(model, rollouts: list[Rollout], cfg: RunConfig, G: int) -> None:
    """Eq. 2-3 for every rollout that wrote an answer; neutral (its group's mean) for those that did not.

    ``rollouts``: all of the update's (the same list on every rank). The answered ones are spread evenly over the
    ranks (``dist.spread``, collective): one ``saliency`` call per rank for its share (the saliency module
    batches them by ``saliency.max_batch`` and computes each distinct prompt once), the results gathered back to
    every rank. A rollout without an answer (truncated) or with a degenerate mask gets the mean saliency reward
    of its group's valid ones (0 if none), so that only its outcome moves its advantage (see
    atmanrl/rl/rollout.py).

    Which rollouts share a batch changes a reward only at float rounding (padding changes the matmul shapes), and
    a rank's share depends on the number of ranks: with the saliency arm on, runs on different numbers of ranks
    agree up to rounding, not bit for bit (a resume still repeats exactly).
    """
    from atmanrl.saliency import saliency

    config = cfg.saliency  # a SaliencyConfig (extended by the reward weight, which saliency() does not read)
    todo = [r for r in rollouts if r.score.saliency_input is not None]

    def my_share(inputs: list) -> list:
        with Progress("saliency", len(inputs), "sequences") as progress:
            # on_step runs after every optimiser step of a batch: a batch of B sequences has done B/steps of them
            return saliency(model, inputs, config,
                            on_step=lambda step, mask, losses: progress.advance(len(losses) / config.steps))

    results = dist.spread(my_share, [r.score.saliency_input for r in todo])
    for r, res in zip(todo, results):
        r.saliency_result = res
        r.saliency_reward = res.reward if res.ok else 0.0
    for g in range(0, len(rollouts), G):
        group = rollouts[g:g + G]
        valid = [r.saliency_reward for r in group if r.saliency_result is not None and r.saliency_result.ok]
        neutral = sum(valid) / len(valid) if valid else 0.0
        for r in group:
            if r.saliency_result is None or not r.saliency_result.ok:
                r.saliency_reward = neutral


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


def minibatch_rows(n: int, M: int, mb: int, rank: int, world: int) -> tuple[list[list[int]], list[int]]:
    """(rank ``rank``'s rollouts of each minibatch, as indices into its share; the micro-batches every rank runs
    per minibatch) for an update of ``n`` rollouts in ``M`` strided minibatches, micro-batches of ``mb``.

    The count is the largest over all ranks (every rank knows every share, so no communication): shares may
    differ by one rollout, or be empty."""

    def local(share: range, m: int) -> list[int]:
        return [i - share.start for i in share if i % M == m]

    rows = [local(dist.share(n, rank, world), m) for m in range(M)]
    slots = [max(math.ceil(len(local(dist.share(n, r, world), m)) / mb) for r in range(world)) for m in range(M)]
    return rows, slots


def _zero_backward(policy, pad_id: int) -> None:
    """A forward and backward that adds exactly 0 to every gradient, for a rank with no rollouts in a micro-batch
    that other ranks compute: FSDP2's all-gathers and reduce-scatters need every rank."""
    logp, _ = sequence_logprobs(policy, [[pad_id]], [[pad_id]])
    (logp.sum() * 0.0).backward()


def policy_update(run: Run, rollouts: list[Rollout]) -> tuple[list[float], LossStats, list[float]]:
    """``ppo_epochs`` passes of ``num_minibatches`` AdamW steps over this rank's share of the rollouts (Eq. 5).

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
    minibatches, slots = minibatch_rows(t.problems_per_update * cfg.rollout.group_size, M, mb, run.d.rank,
                                        run.d.world_size)  # strided by global index: see the module docstring
    policy.train()
    losses, grad_norms, stats = [], [], LossStats()
    optimizer.zero_grad(set_to_none=True)  # nothing may leak in from the rollout/saliency phase
    with Progress("policy update", t.ppo_epochs * sum(slots), "micro-batches") as progress:
        for _ in range(t.ppo_epochs):
            for m in range(M):
                step_loss = torch.zeros((), dtype=torch.float64)
                for s in range(slots[m]):
                    rows = minibatches[m][s * mb:(s + 1) * mb]
                    chunk = [rollouts[i] for i in rows]
                    if g.kl_beta == 0 and not _carries_signal(chunk):
                        progress.advance()
                        continue  # all advantages 0 on every rank: the gradient is exactly 0, skip the forward
                    if not chunk:  # other ranks have rollouts here
                        _zero_backward(policy, pad_id)
                        progress.advance()
                        continue
                    logp, mask = sequence_logprobs(policy, [r.prompt for r in chunk], [r.completion for r in chunk],
                                                   temperature=cfg.rollout.temperature, pad_id=pad_id)
                    width = logp.shape[1]
                    logp_old = _pad([r.logp_old for r in chunk], width, device)
                    ref = _pad([ref_logp[i] for i in rows], width, device) if ref_logp is not None else None
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
