"""Optimising the AtMan mask (paper section 3.2, Eq. 2) and reading it out (Eq. 3): the saliency module's API.

    from atmanrl.saliency import SaliencyConfig, SaliencyInput, saliency

    inputs = [SaliencyInput.from_parts(prompt_ids, cot_ids, delimiter_ids, gold_answer_ids), ...]
    results = saliency(model, inputs, SaliencyConfig())      # one SaliencyResult per input, same order
    results[0].reward          # the rollout's saliency reward (orientation: config.reward, default "reenable")
    results[0].saliency        # (n_cot,) per-CoT-token saliency, 1 - Eq. 3's column mean of Ĥ
    results[0].status          # "ok", or why the input is degenerate (its reward is then 0.0)

For every input: a mask ``p`` over its CoT key columns starts at ``c = -0.4`` (bias -4), and AdamW (lr 1e-3,
betas (0.6, 0.9999), weight decay 0.05) minimises Eq. 2, the mean cross-entropy of the gold answer tokens under
teacher forcing, for 200 steps. Only the mask is trained: the model's parameters are set to
``requires_grad=False`` for the duration of the call (restored afterwards) and gradients are taken with
``torch.autograd.grad(loss, [p])``, so no weight gradient is computed or stored and ``.grad`` of the model is never
touched. The inputs are optimised together in batches with the fast layout of ``atmanrl.saliency.batch``: as
many as the free GPU memory allows (``max_batch=None``; all at once on a CPU) or ``max_batch`` at a time. Pass the
masks of a whole training update in one call: every distinct prompt is computed once per batch; each sequence's loss
depends only on its own mask and the batch loss is the *sum* of the per-sequence losses, so every mask gets exactly
the gradient it would get alone (AdamW is elementwise).

Degenerate inputs are defined results, never exceptions, and never affect the rest of the batch:

- ``empty_cot``: no CoT token, nothing to mask. ``no_answer``: no gold answer token, no loss. Neither is optimised.
- ``nonfinite_loss``: the answer loss became NaN/inf at some step (e.g. overflow in the model). From that step on
  the sequence's gradient is zeroed; its other numbers are reported as they were.
- Every degenerate result carries ``reward = 0.0`` in both orientations (it adds nothing to the outcome reward)
  and an empty ``saliency``. A trainer that wants it exactly neutral inside its GRPO group can replace it by the
  group mean of the valid rewards; ``status`` tells it which ones.

Fewer steps (beyond the paper, off by default): ``SaliencyConfig.compressed(20)`` runs 20 steps at lr 1e-2, a tenth
of the time; how close its per-token saliency comes to the 200-step result is measured in benchmarks/README.md.

Re-opening as the reward (ours, beyond the paper; off by default): ``SaliencyConfig(method="reopen_one")`` runs
``atmanrl.saliency.atman.reopen_one`` instead of the mask optimisation (no gradient, one forward per CoT column;
the suppression is ``scale * init``: set ``init`` to -5, the setting selected against the toy world's planted
truth, since the paper's -0.4 leaves the CoT visible). Its result fills the same ``SaliencyResult``: ``saliency`` is
the share of the answer loss each token restores, ``reward_reenable`` the mean over CoT tokens of that share clipped
to [0, 1] (``ReopenOne.reward``), ``reward_eq3`` one minus it, ``initial_loss`` the answer CE with the whole CoT
suppressed, ``saturated`` when suppressing it costs under ``saturation_loss`` nats (every token then gets 0),
``steps`` 0 and no loss curve.

Saturation (docs/DESIGN.md, pitfall a): when the answer loss at the initial mask is already ~0, the mask
gradients are tiny
and Adam turns them into +-lr steps whatever their size, so the saliency carries little information. Every result
reports ``initial_loss`` (mask at its initial value), ``unmasked_loss`` (no mask) and ``saturated``
(``initial_loss < config.saturation_loss``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from atmanrl.errors import check_range
from atmanrl.model.llama import Llama
from atmanrl.saliency.atman import reopen_one
from atmanrl.saliency.batch import AnswerBatch, SaliencyInput, sequences_per_batch
from atmanrl.saliency.mask import AtManMask
from atmanrl.saliency.readout import REWARDS, Rewards, column_means, normalised_mask, rewards, token_saliency

METHODS = ("mask", "reopen_one")
NORMALIZE = ("none", "group")


@dataclass
class EarlyStop:
    """Stop before ``steps`` when the per-token saliency ranking has settled (beyond the paper; off by default).

    Every ``every`` steps (from ``min_steps`` on) the per-token saliency of each sequence is compared with the one
    ``every`` steps earlier by Spearman's rank correlation; a sequence converges when the correlation reaches
    ``rho``. The batch stops when every live sequence has converged. At the paper's lr the ranking drifts slowly
    and steadily, so this rule tends to stop too early; ``SaliencyConfig.compressed`` is the better way to save
    time (both measured in benchmarks/README.md).
    """

    every: int = 10
    rho: float = 0.99
    min_steps: int = 20

    def __post_init__(self):
        check_range("every", self.every, 1, why="steps between two ranking comparisons")
        check_range("min_steps", self.min_steps, 0)
        if not math.isfinite(self.rho):  # any finite threshold: above 1 never stops, -1 always does
            raise ValueError(f"rho={self.rho} must be a finite number (a Spearman correlation threshold)")


@dataclass
class SaliencyConfig:
    """Every number of the mask optimisation (paper section 3.4 defaults); the one owner of these fields.

    The run configuration's ``saliency`` section (``atmanrl.config.SaliencyRewardConfig``) extends this class with
    the reward weight, so a YAML key such as ``saliency.steps`` is checked here and the trainer passes its section
    straight to ``saliency()``. Every field is checked on construction; a ``ValueError`` names the field first.
    """

    init: float = -0.4  # c: initial value of every mask parameter (bias scale * c = -4); must be < 0
    scale: float = 10.0  # the bias is scale * min(p, 0); must be > 0
    steps: int = 200  # >= 1
    lr: float = 1e-3  # >= 0 (0: the mask never moves, its reenable reward is 0)
    betas: tuple[float, float] = (0.6, 0.9999)  # each in [0, 1)
    weight_decay: float = 0.05  # >= 0
    eps: float = 1e-8  # AdamW epsilon (PyTorch default); > 0
    reward: Literal["reenable", "eq3"] = "reenable"  # "reenable" (default) or "eq3" (literal Eq. 3), see readout
    saturation_loss: float = 0.01  # initial answer CE below this is reported as saturated; >= 0
    max_batch: int | None = None  # sequences per optimisation batch; None: from free GPU memory (CPU: all at once)
    early_stop: EarlyStop | None = None  # None: the paper's fixed step count
    return_mask: bool = False  # keep each optimised Ĥ (rows x CoT) in the result
    # Beyond the paper, both off by default (the module docstring; docs/toyworld.md):
    method: Literal["mask", "reopen_one"] = "mask"  # "mask": Eq. 2-3 (the paper); "reopen_one": re-open one token
    # "none": the paper's R_outcome + weight * R_saliency; "group": the saliency reward standardised inside its GRPO
    # group first (atmanrl.rl.grpo.group_standardised_saliency), so weight = its spread in advantage units
    normalize: Literal["none", "group"] = "none"

    @classmethod
    def compressed(cls, steps: int = 20, **overrides) -> "SaliencyConfig":
        """The paper's schedule in fewer steps: ``steps`` at ``lr = 1e-3 * 200 / steps`` (beyond the paper).

        Adam moves an entry by about lr per step, so keeping ``steps x lr`` keeps how far the mask can move, and the
        reward's scale, where truncating the paper's run would not. Its agreement with the 200-step saliency, and
        that of truncation and ``EarlyStop``, is measured in benchmarks/README.md. Off by default.
        """
        paper = cls()
        return cls(steps=steps, lr=paper.lr * paper.steps / steps, **overrides)

    def __post_init__(self):
        if isinstance(self.early_stop, dict):
            self.early_stop = EarlyStop(**self.early_stop)
        self.betas = tuple(self.betas)
        for name in ("init", "scale", "lr", "weight_decay", "eps", "saturation_loss", "betas"):
            value = getattr(self, name)
            if not all(math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))):
                raise ValueError(f"{name}={value} is not a finite number")
        if self.reward not in REWARDS:
            raise ValueError(f"reward={self.reward!r} is not one of {list(REWARDS)} (see atmanrl.saliency.readout)")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {list(METHODS)} (mask: the paper's optimised "
                             "mask; reopen_one: re-open one CoT token at a time)")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize={self.normalize!r} is not one of {list(NORMALIZE)} (none: the paper's "
                             "reward; group: the saliency reward standardised inside its GRPO group)")
        check_range("init", self.init, high=0, high_open=True, why="the initial mask value c; the paper uses -0.4; at "
                    "c >= 0 the bias scale * min(c, 0) is 0 and nothing is masked")
        check_range("scale", self.scale, 0, low_open=True, why="the paper uses 10: the bias is scale * min(p, 0)")
        check_range("steps", self.steps, 1, why="the paper uses 200")
        for name in ("lr", "weight_decay", "saturation_loss"):
            check_range(name, getattr(self, name), 0)
        check_range("eps", self.eps, 0, low_open=True, why="AdamW divides by sqrt(v) + eps")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)} must be two numbers in [0, 1) (the paper: [0.6, 0.9999])")
        check_range("max_batch", self.max_batch, 1, none_ok=True,
                    why="null sizes batches from free GPU memory, all at once on a CPU")


# Why a result has no saliency: "ok" has one; the others are degenerate inputs (reward 0.0, the trainer gives them
# their group's neutral reward): no CoT token, no answer token, or a non-finite answer loss.
Status = Literal["ok", "empty_cot", "no_answer", "nonfinite_loss"]


@dataclass
class SaliencyResult:
    """The saliency of one input. Tensors are on the CPU, in the mask dtype (float32; float64 for a float64 model)."""

    status: Status  # "ok", or why the input is degenerate
    reward: float  # in the orientation of config.reward; 0.0 unless status == "ok"
    reward_reenable: float  # mean over CoT tokens of (1 - column mean of Ĥ)
    reward_eq3: float  # mean over CoT tokens of the column mean of Ĥ (= 1 - reward_reenable)
    saliency: torch.Tensor  # (n_cot,) 1 - column mean: how much each CoT token was re-enabled
    column_mean: torch.Tensor  # (n_cot,) Eq. 3's inner mean of Ĥ per CoT token
    loss_curve: list[float] = field(default_factory=list)  # Eq. 2 loss at each step, before that step's update
    initial_loss: float = math.nan  # loss_curve[0]: answer CE under the initial mask
    unmasked_loss: float = math.nan  # answer CE without any mask
    steps: int = 0  # optimisation steps taken (< config.steps after an early stop)
    saturated: bool = False  # initial_loss < config.saturation_loss: gradients too small to be informative
    mask: torch.Tensor | None = None  # (rows, n_cot) Ĥ, when config.return_mask

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def saliency(
    model: Llama,
    inputs: Sequence[SaliencyInput],
    config: SaliencyConfig | None = None,
    *,
    on_step: Callable[[int, AtManMask, torch.Tensor], None] | None = None,
) -> list[SaliencyResult]:
    """Optimise one AtMan mask per input (Eq. 2) and read each out (Eq. 3). See the module docstring.

    on_step: called after every optimiser step with ``(step, mask, losses)`` (``losses`` ``(B,)`` of that step,
        before its update) for progress display and the benchmark's steps-versus-quality curve.
    """
    config = config or SaliencyConfig()
    results: list[SaliencyResult | None] = [None] * len(inputs)
    todo = []
    for k, x in enumerate(inputs):
        if x.n_cot == 0:
            results[k] = _degenerate("empty_cot")
        elif x.n_answer == 0:
            results[k] = _degenerate("no_answer")
        else:
            todo.append(k)
    chunk = config.max_batch or sequences_per_batch(model, [inputs[k] for k in todo])
    if config.method == "reopen_one":
        for start in range(0, len(todo), chunk):
            ids = todo[start: start + chunk]
            for k, result in zip(ids, _reopen([inputs[k] for k in ids], model, config)):
                results[k] = result
        return results
    with frozen(model):
        for start in range(0, len(todo), chunk):
            ids = todo[start: start + chunk]
            for k, result in zip(ids, _optimise([inputs[k] for k in ids], model, config, on_step)):
                results[k] = result
    return results


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Model parameters with ``requires_grad=False`` inside the block (autograd then saves no tensors for weight
    gradients); the previous flags are restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _optimise(inputs, model, config: SaliencyConfig, on_step) -> list[SaliencyResult]:
    batch = AnswerBatch(model, inputs)
    mask = AtManMask(
        [x.n_cot for x in inputs],
        [x.mask_rows for x in inputs],
        config.init,
        config.scale,
        device=batch.device,
        dtype=torch.promote_types(batch.dtype, torch.float32),  # the mask stays float32 for a bf16 model
    )
    optimiser = torch.optim.AdamW(
        [mask.p], lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps
    )
    with torch.no_grad():
        unmasked = batch.losses()
    curve = torch.full((config.steps, batch.B), math.nan, device=batch.device, dtype=batch.loss_dtype)
    alive = torch.ones(batch.B, dtype=torch.bool, device=batch.device)  # loss finite at every step so far
    stopper = _Convergence(config.early_stop) if config.early_stop else None
    steps = 0
    for step in range(config.steps):
        bias = mask(*batch.bias_shape, batch.row_offset, batch.col_offset)  # (B, 1, T, P + T)
        losses = batch.losses(bias)  # Eq. 2 per sequence, (B,)
        curve[step] = losses.detach()
        alive &= torch.isfinite(losses.detach())
        # Sum, not mean: each mask's gradient is then exactly its own sequence's gradient.
        (grad,) = torch.autograd.grad(torch.where(alive, losses, 0.0).sum(), [mask.p])
        mask.p.grad = torch.where(alive[:, None, None], grad, 0.0)  # a NaN sequence stops here, the rest go on
        optimiser.step()
        steps = step + 1
        if on_step is not None:
            on_step(step, mask, losses.detach())
        if stopper is not None and stopper.converged(steps, mask, alive):
            break

    curve, unmasked, alive = curve[:steps].T.cpu(), unmasked.cpu(), alive.cpu()
    results = []
    for b in range(batch.B):  # Eq. 3 read-out
        h_hat = normalised_mask(mask.sequence_p(b).detach(), config.init).cpu()
        col = column_means(h_hat)
        r = rewards(col)
        status = "ok" if bool(alive[b]) else "nonfinite_loss"
        initial = float(curve[b, 0])
        results.append(
            SaliencyResult(
                status=status,
                reward=r.oriented(config.reward) if status == "ok" else 0.0,
                reward_reenable=r.reenable if status == "ok" else 0.0,
                reward_eq3=r.eq3 if status == "ok" else 0.0,
                saliency=token_saliency(col) if status == "ok" else torch.zeros(0),
                column_mean=col if status == "ok" else torch.zeros(0),
                loss_curve=curve[b].tolist(),
                initial_loss=initial,
                unmasked_loss=float(unmasked[b]),
                steps=steps,
                saturated=initial < config.saturation_loss,
                mask=h_hat if config.return_mask else None,
            )
        )
    return results


def _reopen(inputs, model, config: SaliencyConfig) -> list[SaliencyResult]:
    """``reopen_one`` as a ``SaliencyResult`` (module docstring): the restored shares, their clipped mean as the
    reward. ``saturation_loss`` is ``reopen_one``'s ``min_span``."""
    out = []
    for r in reopen_one(model, inputs, init=config.init, scale=config.scale, min_span=config.saturation_loss):
        both = Rewards(reenable=r.reward, eq3=1.0 - r.reward)
        out.append(SaliencyResult(
            status="ok", reward=both.oriented(config.reward), reward_reenable=both.reenable, reward_eq3=both.eq3,
            saliency=r.restored, column_mean=1.0 - r.restored.clamp(0.0, 1.0), initial_loss=r.suppressed_loss,
            unmasked_loss=r.unmasked_loss, steps=0,
            saturated=r.suppressed_loss - r.unmasked_loss < config.saturation_loss))
    return out


def _degenerate(status: Status) -> SaliencyResult:
    empty = torch.zeros(0)
    return SaliencyResult(status, 0.0, 0.0, 0.0, empty, empty)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (average ranks for ties); 1.0 when either is constant."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return 1.0 if denom == 0 else (ra @ rb).item() / denom


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in x.unique():  # average the ranks of ties
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


class _Convergence:
    """``EarlyStop``: compares each sequence's per-token saliency every ``every`` steps."""

    def __init__(self, rule: EarlyStop):
        self.rule, self.previous = rule, None

    def converged(self, steps: int, mask: AtManMask, alive: torch.Tensor) -> bool:
        if steps % self.rule.every:
            return False
        current = [
            token_saliency(column_means(normalised_mask(mask.sequence_p(b).detach(), mask.init))).cpu()
            for b in range(len(mask.cot_lengths))
        ]
        previous, self.previous = self.previous, current
        if previous is None or steps < self.rule.min_steps:
            return False
        live = alive.cpu().tolist()
        return all(spearman(c, p) >= self.rule.rho for c, p, ok in zip(current, previous, live) if ok)
