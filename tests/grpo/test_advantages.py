import random
import statistics

import pytest
import torch

from megatron_lpreg.grpo import group_advantages, group_stats


def reference(rewards, group_size, eps=1e-6, normalize_std=True):
    out = []
    for g in range(len(rewards) // group_size):
        grp = [float(x) for x in rewards[g * group_size : (g + 1) * group_size]]
        mean = statistics.fmean(grp)
        std = statistics.stdev(grp)  # unbiased (n - 1)
        for x in grp:
            if len(set(grp)) == 1:
                out.append(0.0)
            elif normalize_std:
                out.append((x - mean) / (std + eps))
            else:
                out.append(x - mean)
    return out


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("normalize_std", [True, False])
def test_matches_python_reference(seed, normalize_std):
    rng = random.Random(seed)
    group_size = rng.choice([2, 3, 4, 8])
    groups = rng.randint(1, 6)
    if seed % 2:
        rewards = [float(rng.random() < 0.4) for _ in range(groups * group_size)]
    else:
        rewards = [rng.uniform(-2, 3) for _ in range(groups * group_size)]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), group_size, normalize_std=normalize_std)
    assert got.dtype == torch.float32 and got.shape == (len(rewards),)
    ref = torch.tensor(reference(rewards, group_size, normalize_std=normalize_std), dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


def test_binary_group_of_eight_by_hand():
    # 2 correct out of 8: mean 0.25, unbiased std sqrt(0.25*0.75*8/7).
    rewards = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.float32)
    std = (0.25 * 0.75 * 8 / 7) ** 0.5
    adv = group_advantages(rewards, 8)
    torch.testing.assert_close(adv[0], torch.tensor(0.75 / (std + 1e-6)))
    torch.testing.assert_close(adv[1], torch.tensor(-0.25 / (std + 1e-6)))
    # Biased std would give 0.75 / sqrt(0.1875) = 1.732; unbiased gives 1.620.
    assert abs(float(adv[0]) - 1.6202) < 1e-3
    assert abs(float(adv.sum())) < 1e-5


def test_identical_groups_get_exact_zero():
    rewards = torch.tensor([1.0] * 4 + [0.0] * 4 + [0.1] * 4 + [0.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4)
    assert torch.equal(adv[:12], torch.zeros(12))
    assert (adv[12:] != 0).all()
    adv_dr = group_advantages(rewards, 4, normalize_std=False)
    assert torch.equal(adv_dr[:12], torch.zeros(12))
    torch.testing.assert_close(adv_dr[12:], torch.tensor([-0.25, 0.75, -0.25, -0.25]))


def test_group_major_layout():
    # Group 0 all zero, group 1 has one success in slot 1: only rows 4..7 are non-zero.
    rewards = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0], dtype=torch.float32)
    adv = group_advantages(rewards, 4)
    assert torch.equal(adv[:4], torch.zeros(4))
    assert adv[5] > 0 and (adv[[4, 6, 7]] < 0).all()


def test_integer_and_list_inputs_and_empty():
    assert torch.equal(group_advantages(torch.tensor([1, 1, 0, 0]), 2), group_advantages([1.0, 1.0, 0.0, 0.0], 2))
    empty = group_advantages(torch.zeros(0), 8)
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(10), 8)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError):
        group_stats(torch.zeros(6), 4)


def test_group_stats():
    rewards = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0], dtype=torch.float32)
    s = group_stats(rewards, 4)
    assert s["num_groups"] == 4 and s["group_size"] == 4
    assert s["reward_mean"] == pytest.approx(7 / 16)
    assert s["frac_all_correct"] == pytest.approx(0.25)
    assert s["frac_all_wrong"] == pytest.approx(0.25)
    assert s["frac_zero_adv_groups"] == pytest.approx(0.5)
    assert s["frac_solved_any"] == pytest.approx(0.75)
    stds = [statistics.stdev(rewards[i : i + 4].tolist()) for i in range(0, 16, 4)]
    assert s["group_std_mean"] == pytest.approx(statistics.fmean(stds))
    # zero-advantage groups agree with group_advantages
    adv = group_advantages(rewards, 4).view(4, 4)
    assert s["frac_zero_adv_groups"] == pytest.approx(float((adv == 0).all(dim=1).double().mean()))
    empty = group_stats(torch.zeros(0), 8)
    assert empty["num_groups"] == 0 and empty["frac_zero_adv_groups"] == 0.0
