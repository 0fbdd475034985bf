"""Reinforcement learning for AtManRL: GRPO math (``grpo``), rollouts (``rollout``), the training loop
(``trainer``), resumable checkpoints (``checkpointing``) and the run directory (``rundir``: lock, resume or
refuse an earlier run, logs)."""

from atmanrl.rl.grpo import clipped_objective, group_advantages, grpo_loss, outcome_reward, total_reward

__all__ = ["clipped_objective", "group_advantages", "grpo_loss", "outcome_reward", "total_reward"]
