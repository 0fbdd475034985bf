"""GRPO formulas (Eq. 4, 5) against hand computations."""

import math

import pytest
import torch

from atmanrl.rl.grpo import (
    clipped_objective,
    group_advantages,
    group_standardised_saliency,
    grpo_loss,
    is_clipped,
    kl_k3,
    outcome_reward,
    total_reward,
)


def test_outcome_reward_eq4():
    assert outcome_reward(torch.tensor([True, False, True])).tolist() == [0.0, -1.0, 0.0]


def test_total_reward_weight():
    o, s = torch.tensor([0.0, -1.0]), torch.tensor([0.1, 0.3])
    assert total_reward(o, s, 1.0).tolist() == pytest.approx([0.1, -0.7])
    assert total_reward(o, s, 0.0).tolist() == [0.0, -1.0]  # the baseline arm


def test_group_standardised_saliency_by_hand():
    s = torch.tensor([[0.2, 0.2, 0.2, 0.6], [0.05, 0.05, 0.05, 0.05], [0.1, 0.3, 0.1, 0.3]], dtype=torch.float64)
    z = group_standardised_saliency(s)
    # group 0: mean 0.3, deviations (-0.1, -0.1, -0.1, +0.3), population var 0.12 / 4 = 0.03, std sqrt(0.03)
    assert z[0].tolist() == pytest.approx([-1 / math.sqrt(3)] * 3 + [math.sqrt(3)])
    assert z[1].tolist() == [0.0] * 4  # no spread: nothing to rank, no division by ~0
    assert z[2].tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])  # mean 0.2, std 0.1
    # scale-free: the same z for 100x smaller rewards shifted by a constant (the point of the option)
    assert group_standardised_saliency(0.01 * s[:1] + 5).tolist()[0] == pytest.approx(z[0].tolist())
    # a spread at rounding level (<= eps) is treated as none
    assert group_standardised_saliency(torch.tensor([[0.1, 0.1 + 1e-9]], dtype=torch.float64)).tolist() == [[0, 0]]


def test_group_advantages_by_hand():
    r = torch.tensor([[0.0, -1.0, -1.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    a, zero = group_advantages(r)
    assert a.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
    assert zero.tolist() == [False, True]
    a_std, _ = group_advantages(r, std_normalize=True, eps=0.0)
    assert a_std[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0])  # population std 0.5
    assert a_std[1].tolist() == [0.0] * 4 or torch.isnan(a_std[1]).all()  # eps=0 on a zero group: caller's choice
    a_std, _ = group_advantages(r, std_normalize=True)
    assert a_std[1].tolist() == [0.0] * 4  # default eps keeps zero-variance groups at 0


@pytest.mark.parametrize(
    "ratio, adv, expected, clipped",
    [
        # A > 0: the objective stops growing above 1 + eps (clipped), is unclipped below 1
        (1.5, 2.0, 1.2 * 2.0, True),
        (1.1, 2.0, 1.1 * 2.0, False),
        (0.5, 2.0, 0.5 * 2.0, False),
        # A < 0: the objective stops improving below 1 - eps (clipped), is unclipped (pessimistic) above 1
        (0.5, -2.0, 0.8 * -2.0, True),
        (0.9, -2.0, 0.9 * -2.0, False),
        (1.5, -2.0, 1.5 * -2.0, False),
    ],
)
def test_clipped_objective_both_sides(ratio, adv, expected, clipped):
    r, a = torch.tensor(ratio, requires_grad=True), torch.tensor(adv)
    obj = clipped_objective(r, a, 0.2)
    assert obj.item() == pytest.approx(expected)
    assert bool(is_clipped(r, a, 0.2)) == clipped
    obj.backward()
    # where the clip is active the objective is flat in the ratio: no gradient
    assert r.grad.item() == pytest.approx(0.0 if clipped else adv)


def test_token_loss_by_hand():
    logp_old = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.0, 0.0]]).clamp(min=1e-30))
    ratios = torch.tensor([[1.5, 0.9, 1.0], [0.7, 1.0, 1.0]])
    logp = logp_old + ratios.log()
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([1.0, -1.0])
    loss, st = grpo_loss(logp, logp_old, mask, adv, eps=0.2)
    # rollout 0: tokens min(1.5, 1.2)*1 = 1.2 and 0.9 -> mean 1.05; rollout 1: min(-0.7, -0.8) = -0.8
    assert loss.item() == pytest.approx(-(1.05 - 0.8) / 2, abs=1e-6)
    assert st.units == 3 and st.clipped == 2  # 1.5 with A>0 and 0.7 with A<0
    assert st.ratio_min == pytest.approx(0.7) and st.ratio_max == pytest.approx(1.5)
    assert st.ratio_sum == pytest.approx(1.5 + 0.9 + 0.7)
    # count = global N of Eq. 5
    loss4, _ = grpo_loss(logp, logp_old, mask, adv, eps=0.2, count=4)
    assert loss4.item() == pytest.approx(loss.item() / 2)


def test_sequence_ratio_by_hand():
    logp_old = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    logp = logp_old + torch.tensor([[0.1, 0.2], [-0.4, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([0.5, -1.0])
    loss, st = grpo_loss(logp, logp_old, mask, adv, eps=0.2, ratio="sequence")
    r0, r1 = math.exp(0.3), math.exp(-0.4)  # products of token ratios: 1.35 (clipped at 1.2), 0.67 (clipped at 0.8)
    expected = -(min(r0 * 0.5, 1.2 * 0.5) + min(r1 * -1.0, 0.8 * -1.0)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert st.units == 2 and st.clipped == 2


def test_first_pass_gradient_is_reinforce_with_baseline():
    """ratio == 1 (logp_old = logp): grad of Eq. 5 = -1/N sum_i A_i mean_t grad log pi(a_it), computed by hand.

    Policy: logits = W x_t for a linear softmax policy, so grad_W log pi(a|x) = (onehot(a) - softmax(Wx)) x^T.
    """
    torch.manual_seed(0)
    V, D, B, T = 5, 4, 3, 4
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, T, D, dtype=torch.float64)
    actions = torch.randint(0, V, (B, T))
    lengths = [4, 2, 3]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    adv = torch.tensor([0.7, -0.2, -0.5], dtype=torch.float64)
    logp = torch.log_softmax(x @ W.T, -1).gather(-1, actions[..., None]).squeeze(-1)
    loss, st = grpo_loss(logp, logp.detach(), mask, adv, eps=0.2)
    loss.backward()
    assert st.clipped == 0 and st.ratio_min == 1.0 == st.ratio_max

    probs = torch.softmax(x @ W.detach().T, -1)
    hand = torch.zeros(V, D, dtype=torch.float64)
    for i in range(B):
        g_i = torch.zeros(V, D, dtype=torch.float64)
        for t in range(lengths[i]):
            onehot = torch.nn.functional.one_hot(actions[i, t], V).double()
            g_i += torch.outer(onehot - probs[i, t], x[i, t])
        hand += adv[i] * g_i / lengths[i]
    hand = -hand / B
    assert torch.allclose(W.grad, hand, atol=1e-12, rtol=0)


def test_kl_k3_is_zero_at_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0, -0.3])
    assert kl_k3(logp, logp).abs().max().item() == 0
    assert (kl_k3(logp, logp + torch.tensor([0.5, -0.5, 1.0])) > 0).all()
    mask = torch.ones(1, 3, dtype=torch.bool)
    l0, _ = grpo_loss(logp[None], logp[None], mask, torch.zeros(1), kl_beta=0.1, ref_logp=logp[None] + 0.5)
    d = torch.tensor(0.5)
    assert l0.item() == pytest.approx(0.1 * (d.exp() - d - 1).item())
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp[None], logp[None], mask, torch.zeros(1), kl_beta=0.1)
