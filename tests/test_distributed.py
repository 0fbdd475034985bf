"""Gloo processes under torchrun + FSDP2 train like one plain process, in float32, with the masks spread over ranks.

The global batch does not depend on the world size (per-rollout sampling seeds, contiguous rollout shares per rank,
strided minibatches) and each rank's loss is divided by the global rollout count with gradients summed by FSDP2
(a plain ``ReduceOp.SUM``: gloo has no ``PREMUL_SUM``), so one process and several must agree. All runs: the tiny
float32 Llama of tests/tiny.py, rewards that vary (so every update runs backwards), 1 intra-op thread.

- Outcome reward only, 3 updates x 2 passes x 2 minibatches (12 optimizer steps), 2 processes vs 1. Each rank's
  share of a minibatch is one micro-batch, and one process splits its minibatch into the same two micro-batches,
  so the forwards and backwards are the same computations and the gradient is g0 + g1 in both (a two-term IEEE
  sum is commutative). Measured: losses and trained weights equal bit for bit (difference 0.0) for SGD and AdamW;
  pinned 1e-6. Should a kernel that depends on the batch shape (the rollouts are drawn at batch 32 vs 16) break
  the bit equality on other hardware, AdamW turns a rounding-level change of a near-zero gradient entry into an
  lr-sized step there: then compare the losses tightly and the weights to a few lr.
- Saliency reward on (3 mask steps), W = 1, 2, 4 processes x problems_per_update 1, 2, 8 (so P < W too: a group
  is split over ranks), and one group of 3 (shares of unequal size, one empty); SGD, 2 updates. Every rank
  optimises the masks of an equal share of the answered rollouts, a batch shape that depends on W, so the rewards
  agree to float32 rounding, not bit for bit. Measured max difference 7e-7 on the per-rollout saliency rewards
  (of magnitude ~3e-3), 2.4e-7 on the weights (which moved by 7e-4 to 6e-2). Pinned: 5e-6 and 2e-6.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import TinyTask, tiny_config, tiny_policy
from torch.distributed.fsdp import FSDPModule

from atmanrl import dist
from atmanrl.model import load_hf
from atmanrl.model.generate import generate, sequence_logprobs
from atmanrl.model.llama import Llama, LlamaConfig
from atmanrl.rl import trainer

TESTS = Path(__file__).resolve().parent

PLAIN = {  # outcome reward only: 1 vs 2 processes, bit for bit
    optimizer: [f"train.optimizer={optimizer}", "train.lr=0.05", "train.max_updates=3", "rollout.max_new_tokens=3"]
    for optimizer in ("sgd", "adamw")
}
SALIENCY = {  # the masks spread over ranks: 1 vs 2 vs 4 processes, whatever problems_per_update
    f"saliency_p{p}": [f"train.problems_per_update={p}", "train.optimizer=sgd", "train.lr=0.2",
                       "train.max_updates=2", "rollout.max_new_tokens=3", "saliency.weight=1", "saliency.steps=3"]
    for p in (1, 2, 8)
}
# 3 rollouts, micro-batches of 1: shares 1 + 2 on 2 ranks, 0 + 1 + 1 + 1 on 4 (rank 0 then draws, masks and
# trains nothing, yet takes part in every FSDP forward)
SALIENCY["saliency_uneven"] = [*SALIENCY["saliency_p1"], "rollout.group_size=3", "train.num_minibatches=1",
                               "train.micro_batch_size=1"]

WORKER = textwrap.dedent("""
    import sys
    from atmanrl import dist
    from test_distributed import collectives, run_arm

    dist.init("cpu")
    collectives(sys.argv[1])
    for name in sys.argv[2:]:
        run_arm(sys.argv[1], name)
    dist.shutdown()
""")


def collectives(root) -> None:
    """What dist.share / all_gather_list / spread give on this rank (rank 0 writes root/collectives.json)."""
    d = dist.info()
    record = {"shares": dist.all_gather_list([list(dist.share(3))]),
              "gathered": dist.all_gather_list([d.rank] * d.rank),  # rank r contributes r items, rank 0 none
              "spread": dist.spread(lambda xs: [(x, dist.info().rank) for x in xs], list(range(10, 13)))}
    if d.is_main:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "collectives.json").write_text(json.dumps(record))


def run_arm(root, name: str) -> None:
    """One arm into ``root/name``: metrics.jsonl, the exported policy and (rank 0) every update's saliency rewards
    per rollout in saliency.json."""
    out = Path(root) / name
    cfg = tiny_config(out, "checkpoint.export=true", *(PLAIN | SALIENCY)[name])
    rewards = []

    def recording(model, rollouts, cfg, G):
        recorded(model, rollouts, cfg, G)
        rewards.append([r.saliency_reward for r in rollouts])  # all of the update's rollouts, on every rank

    recorded, trainer.saliency_rewards = trainer.saliency_rewards, recording
    try:
        trainer.train(cfg, policy=tiny_policy(), task=TinyTask(saliency=name in SALIENCY), problems=list(range(8)))
    finally:
        trainer.saliency_rewards = recorded
    if dist.info().is_main:
        (out / "saliency.json").write_text(json.dumps(rewards))


def torchrun(root: Path, world: int, arms) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(root / "worker.py"), str(root / f"w{world}"), *arms],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """root/w{1,2,4}/<arm>: one plain process, 2 and 4 torchrun processes."""
    root = tmp_path_factory.mktemp("dist")
    (root / "worker.py").write_text(WORKER)
    torchrun(root, 2, [*PLAIN, *SALIENCY])
    torchrun(root, 4, [*SALIENCY])
    dist.shutdown()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1): tiny matmuls only lose from threads
    try:
        for name in [*PLAIN, *SALIENCY]:
            run_arm(root / "w1", name)
    finally:
        torch.set_num_threads(threads)
        dist.shutdown()
    return root


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _params(run: Path) -> dict:
    return load_hf(run / "policy", dtype=torch.float32).state_dict()


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_collectives_on_real_process_groups(runs):
    """Shares are contiguous and in rank order (4 ranks, 3 items: one rank has none); gathering concatenates in rank
    order; spread computes each item once, on the rank whose share holds it, and returns all results everywhere."""
    two = json.loads((runs / "w2" / "collectives.json").read_text())
    four = json.loads((runs / "w4" / "collectives.json").read_text())
    assert two["shares"] == [[0], [1, 2]] and four["shares"] == [[], [0], [1], [2]]
    assert two["gathered"] == [1] and four["gathered"] == [1, 2, 2, 3, 3, 3]
    assert two["spread"] == [[10, 0], [11, 1], [12, 1]] and four["spread"] == [[10, 1], [11, 2], [12, 3]]


@pytest.mark.parametrize("optimizer", list(PLAIN))
def test_two_processes_train_like_one_in_float32(runs, optimizer):
    one, two = runs / "w1" / optimizer, runs / "w2" / optimizer
    m1, m2 = _metrics(one), _metrics(two)
    l1, l2 = [x for r in m1 for x in r["losses"]], [x for r in m2 for x in r["losses"]]
    assert len(l1) == len(l2) == 3 * 2 * 2  # no update was skipped: every optimizer step ran a backward
    assert all(r["zero_variance_groups"] < r["groups"] for r in m1)
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-6, (l1, l2)
    assert all(abs(x) > 1e-6 for x in l1)  # not trivially zero
    p1, p2 = _params(one), _params(two)
    assert _max_diff(p1, p2) <= 1e-6
    assert _max_diff(p1, tiny_policy().state_dict()) > 1e-3  # the runs did train
    for a, b in zip(m1, m2):  # identical rollouts: the same rewards and lengths per update
        assert (a["reward_total"], a["completion_len"], a["accuracy"]) == (b["reward_total"], b["completion_len"],
                                                                            b["accuracy"])


@pytest.mark.parametrize("name", list(SALIENCY))
def test_masks_spread_over_ranks_give_the_same_rewards_and_policy(runs, name):
    """W = 1, 2, 4 processes, also with fewer problems per update than processes (problems_per_update 1 and 2)
    and with shares of unequal size, one of them empty."""
    rewards = {w: json.loads((runs / f"w{w}" / name / "saliency.json").read_text()) for w in (1, 2, 4)}
    params = {w: _params(runs / f"w{w}" / name) for w in (1, 2, 4)}
    cfg = tiny_config("unused", *SALIENCY[name])
    n = cfg.train.problems_per_update * cfg.rollout.group_size
    assert [len(u) for u in rewards[1]] == [n] * 2  # every rollout of both updates has its reward
    assert len({x for u in rewards[1] for x in u}) > 1  # the rewards vary: groups are not zero-variance
    for w in (2, 4):
        assert [len(u) for u in rewards[w]] == [len(u) for u in rewards[1]]
        assert max(abs(a - b) for u, v in zip(rewards[1], rewards[w]) for a, b in zip(u, v)) <= 5e-6
        assert _max_diff(params[1], params[w]) <= 2e-6, w
        assert [r["accuracy"] for r in _metrics(runs / f"w{w}" / name)] == [
            r["accuracy"] for r in _metrics(runs / "w1" / name)]
    assert _max_diff(params[1], tiny_policy().state_dict()) > 5e-4  # the runs did train, far beyond the tolerance


@pytest.mark.parametrize("n, M, mb", [(64, 2, 8), (8, 2, 1), (3, 1, 1), (64, 2, 1), (6, 2, 4)])
def test_minibatches_are_the_same_for_any_number_of_ranks(n, M, mb):
    """Over the ranks' shares, minibatch m is every rollout with global index m mod M, for any world size (the
    paper's 64 rollouts on 48 GPUs, more ranks than rollouts); every rank runs the same number of micro-batches,
    enough for the rank with the most rollouts in that minibatch."""
    for world in (1, 2, 3, 4, 8, 48, 100):
        per_rank = [trainer.minibatch_rows(n, M, mb, rank, world) for rank in range(world)]
        assert len({tuple(slots) for _, slots in per_rank}) == 1  # the same count on every rank
        slots = per_rank[0][1]
        for m in range(M):
            glob = [dist.share(n, rank, world).start + i for rank, (rows, _) in enumerate(per_rank) for i in rows[m]]
            assert glob == list(range(m, n, M))
            assert slots[m] == max(-(-len(rows[m]) // mb) for rows, _ in per_rank)
    assert trainer.minibatch_rows(8, 2, 1, 0, 1) == ([[0, 2, 4, 6], [1, 3, 5, 7]], [4, 4])


def test_problems_per_update_is_checked_against_minibatches_only():
    trainer.validate(tiny_config("unused", "train.problems_per_update=1"))  # 8 rollouts, 2 minibatches
    with pytest.raises(ValueError, match=r"3 rollouts .* train.num_minibatches=2"):
        trainer.validate(tiny_config("unused", "train.problems_per_update=1", "rollout.group_size=3"))


@pytest.fixture
def one_rank_group(monkeypatch):
    """A real gloo process group of one rank in this process (as ``torchrun --nproc_per_node 1`` would make)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dist.shutdown()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield dist.init("cpu")
    finally:
        torch.set_num_threads(threads)
        dist.shutdown()


def test_bf16_sampler_logprobs_match_the_mixed_precision_policy(one_rank_group):
    """The trainer's sampler (``dist.inference_copy`` in bf16) records the log-probs that the FSDP2 policy under
    bf16 mixed precision recomputes: both keep the RoPE frequencies float32. Prompts of 120-200 tokens, so that
    the positions are long enough for bf16 frequencies to show.

    Measured: mean |difference| 8e-4 (bf16 rounding: the cached decode and the full forward round differently);
    with the frequencies rounded to bf16, as ``.to(bfloat16)`` used to do, 0.06. Pinned: below 5e-3, and the
    bf16-frequency sampler at least 10x further off (the comparison can fail)."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, rope_scaling=None, max_position_embeddings=512,
                      tie_word_embeddings=True)
    policy = Llama(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (180, 200, 150, 120)]
    sampler = dist.inference_copy(policy, torch.bfloat16).eval()
    assert sampler.embed_tokens.weight.dtype == torch.bfloat16
    assert sampler.inv_freq.dtype == torch.float32 and torch.equal(sampler.inv_freq, policy.inv_freq)
    rounded = dist.inference_copy(policy, torch.bfloat16).eval()
    rounded.inv_freq = rounded.inv_freq.bfloat16()  # the old behaviour of .to(bfloat16)
    sharded = dist.shard(policy, torch.bfloat16)
    assert isinstance(sharded, FSDPModule)

    def mean_error(model) -> float:
        with torch.no_grad():
            out = generate(model, prompts, max_new_tokens=16, temperature=1.0, top_p=1.0, stop_ids=[], pad_id=0,
                           seed=[1, 2, 3, 4])
            logp, mask = sequence_logprobs(sharded, prompts, [c.tokens for c in out])
        recorded = torch.zeros_like(logp)
        for i, c in enumerate(out):
            recorded[i, :len(c.logprobs)] = torch.tensor(c.logprobs)
        return (logp - recorded).abs()[mask].mean().item()

    good, bad = mean_error(sampler), mean_error(rounded)
    assert good < 5e-3, good
    assert bad > 10 * good, (good, bad)
