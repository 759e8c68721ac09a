"""PPO/DPO arithmetic against values computed by hand."""

import math

import pytest
import torch

from training.logprobs import dpo_loss, entropy_from_logits
from training.rl.losses import (AdaptiveKLController, gae, kl_estimate, last_token_index, policy_loss, token_rewards,
                                value_loss, whiten)


def test_gae_matches_hand_computation_and_ignores_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])      # last slot is padding: its 9 must not count
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.3
    d1 = 0.0 + gamma * 0.3 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]]), atol=1e-6)


def test_whiten_normal_and_all_equal():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, var = 2.5, 1.25
    expected = (x - mean) / math.sqrt(var + 1e-8)
    assert torch.allclose(whiten(x), expected, atol=1e-6)
    equal = whiten(torch.full((5,), 3.0))
    assert not torch.isnan(equal).any()
    assert torch.equal(equal, torch.zeros(5))


def test_kl_estimators_unclamped():
    logp = torch.tensor([-1.0, -3.0])
    ref = torch.tensor([-2.0, -0.5])
    k1 = kl_estimate(logp, ref, "k1")
    assert torch.allclose(k1, torch.tensor([1.0, -2.5]))          # negative values kept (no clamp)
    k3 = kl_estimate(logp, ref, "k3")
    r = torch.exp(ref - logp)
    assert torch.allclose(k3, (r - 1) - torch.log(r), atol=1e-6)
    assert torch.allclose(k3[1], torch.tensor(math.exp(2.5) - 1 - 2.5), atol=1e-4)  # large, not clamped
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_estimate(logp, ref, "k9")


def test_reward_goes_to_last_real_token_not_padding():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    kl = torch.tensor([[0.1, 0.2, 5.0, 5.0], [0.0, 0.0, 0.0, 0.1]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert last_token_index(mask).tolist() == [1, 3]
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1 + 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, -0.05 - 1.0]]))


def test_clipped_policy_loss_hand_values():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.8, 0.3]]))                  # ratios 1.6 and 0.6
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    # token 1: max(-1.6, -1.2) = -1.2 ; token 2: max(0.6, 0.8) = 0.8
    assert torch.allclose(loss, torch.tensor((-1.2 + 0.8) / 2), atol=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1.0)


def test_clipped_value_loss_hand_values():
    v = torch.tensor([[2.0, 0.0]])
    old = torch.tensor([[1.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0]])
    loss = value_loss(v, old, ret, torch.ones(1, 2), clip=0.5)
    # token 1: max((2-1)^2, (1.5-1)^2) = 1 ; token 2: max(1, 1) = 1 -> 0.5 * mean = 0.5
    assert loss.item() == pytest.approx(0.5)


def test_entropy_uniform():
    logits = torch.zeros(1, 1, 4)
    assert entropy_from_logits(logits).item() == pytest.approx(math.log(4), abs=1e-6)


def test_dpo_loss_hand_value():
    loss, margin = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                            torch.tensor([-2.5]), beta=0.1)
    m = (-1.0 + 2.0) - (-3.0 + 2.5)                               # 1.5
    assert margin.item() == pytest.approx(0.1 * m)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.15))), abs=1e-6)


def test_adaptive_kl_moves_towards_target():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(2.0, batch_size=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    fixed = AdaptiveKLController(0.1, target=None)
    assert fixed.update(5.0, 10) == 0.1
