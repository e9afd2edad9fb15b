"""EBFT maths (`ftlab.methods.ebft_math`) on cases small enough to work out by hand: layer indices, pooling with
padding on either side, whitening, the reward and its parts, and the advantage estimators against their definitions."""
import math
import pytest
import torch
from ftlab.methods.ebft_math import (ADVANTAGE_ESTIMATORS, EMBED_METHODS, advantages, feature_layer_indices,
                                     feature_rewards, layer_features, normalise_features, pool_embeddings, whiten)


# --- layers ---------------------------------------------------------------------------------------------------

def test_layer_indices_round_down_into_the_hidden_state_tuple():
    assert feature_layer_indices([0.25, 0.5, 0.75], 32) == [8, 16, 24]
    assert feature_layer_indices([0.25, 0.5, 0.75], 6) == [1, 3, 4]        # 1.5, 3.0, 4.5 rounded down
    assert feature_layer_indices([0.1, 1.0], 4) == [0, 4]                   # 0.4 -> the embeddings; 1.0 -> the last layer
    with pytest.raises(ValueError, match="1.5"): feature_layer_indices([1.5], 4)


def test_layer_features_concatenate_and_optionally_normalise_each_layer():
    states = (torch.full((1, 2, 2), 9.),                                    # the embeddings, not chosen
              torch.tensor([[[3., 4.], [1., 0.]]]), torch.tensor([[[0., 5.], [0., 0.5]]]))
    assert layer_features(states, [2, 1]).tolist() == [[[0., 5., 3., 4.], [0., 0.5, 1., 0.]]]
    # per token and per layer: (3, 4) / 5 = (0.6, 0.8), (0, 5) / 5 = (0, 1); (1, 0) stays, (0, 0.5) / 0.5 = (0, 1)
    want = torch.tensor([[[0.6, 0.8, 0., 1.], [1., 0., 0., 1.]]])
    assert torch.allclose(layer_features(states, [1, 2], per_layer_norm=True), want)


# --- pooling ---------------------------------------------------------------------------------------------------

# three rows with the real tokens 1, 2, 4, 8 (feature = value): no padding, right padding, left padding
H = torch.tensor([[[1.], [2.], [4.], [8.], [0.], [0.]],
                  [[1.], [2.], [4.], [8.], [50.], [60.]],
                  [[70.], [80.], [1.], [2.], [4.], [8.]]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])


def test_last_token_is_the_last_real_token_on_either_side():
    assert pool_embeddings(H, "last_token", MASK)[:, 0].tolist() == [8., 8., 8.]
    assert pool_embeddings(H, "last_token")[:, 0].tolist() == [0., 60., 8.]   # no mask: the row's last position


def test_mean_pooling_skips_padding():
    # (1 + 2 + 4 + 8) / 4 = 3.75 in every row; the padded values 50, 60, 70, 80 would change it
    assert torch.allclose(pool_embeddings(H, "mean_pooling", MASK)[:, 0], torch.tensor([3.75] * 3))


def test_completion_mean_counts_the_prompt_in_real_tokens():
    # a 1-token prompt: (2 + 4 + 8) / 3; a 3-token prompt: 8; a 4-token prompt leaves nothing: 0
    got = pool_embeddings(H, "completion_mean", MASK, prompt_lengths=torch.tensor([1, 3, 4]))[:, 0]
    assert torch.allclose(got, torch.tensor([14 / 3, 8., 0.]))
    left = pool_embeddings(H[2:], "completion_mean", MASK[2:], prompt_lengths=torch.tensor([1]))
    assert torch.allclose(left[:, 0], torch.tensor([14 / 3]))       # left padding: the prompt is token 1, not a pad
    with pytest.raises(ValueError, match="prompt_lengths"): pool_embeddings(H, "completion_mean", MASK)


def test_concat_takes_quarter_half_three_quarters_of_the_real_length():
    # 4 real tokens: ranks 4//4 = 1, 4//2 = 2, 12//4 = 3 -> values 2, 4, 8 on both sides
    assert pool_embeddings(H, "concat", MASK).tolist() == [[2., 4., 8.]] * 3
    # 7 real tokens 0..6: ranks 1, 3, 5; 2 real tokens 10, 11: ranks 0, 1, 1
    h = torch.tensor([[[0.], [1.], [2.], [3.], [4.], [5.], [6.]], [[0.], [0.], [0.], [0.], [0.], [10.], [11.]]])
    m = torch.tensor([[1] * 7, [0] * 5 + [1] * 2])
    assert pool_embeddings(h, "concat", m).tolist() == [[1., 3., 5.], [10., 11., 11.]]


def test_unknown_embed_method():
    assert EMBED_METHODS == ("last_token", "mean_pooling", "completion_mean", "concat")
    with pytest.raises(ValueError, match="max_pool"): pool_embeddings(H, "max_pool", MASK)


# --- whitening and normalisation --------------------------------------------------------------------------------

def test_whitening_a_rank_deficient_group_by_hand():
    # rows e1, 2 e1, e2: genᵀgen = diag(5, 1, 0), so U = I, S = (√5, 1, 0); the 0 is dropped: W = diag(1/√5, 1, 0)
    gen, ref = torch.tensor([[1., 0, 0], [2, 0, 0], [0, 1, 0]]), torch.tensor([[3., 4, 5]])
    gw, rw = whiten(gen, ref)
    r5 = math.sqrt(5)
    assert torch.allclose(gw, torch.tensor([[1 / r5, 0, 0], [2 / r5, 0, 0], [0, 1, 0]]), atol=1e-6)
    assert torch.allclose(rw, torch.tensor([[3 / r5, 4, 0]]), atol=1e-6)
    assert torch.allclose(gw.T @ gw, torch.diag(torch.tensor([1., 1, 0])), atol=1e-6)   # identity on the span


def test_tiny_singular_values_are_dropped_at_1e5_of_the_largest():
    gen, ref = torch.tensor([[1., 0], [0, 1e-7]]), torch.tensor([[0., 1]])
    assert whiten(gen, ref)[1].abs().max() == 0                     # 1e-7 < 1e-5: direction e2 gets weight 0
    assert torch.allclose(whiten(gen, ref, tol=1e-8)[1], torch.tensor([[0., 1e7]]), rtol=1e-3)   # kept: 1 / 1e-7
    gen = torch.tensor([[1., 0], [0, 1e-3]])                        # 1e-3 > 1e-5: kept, e2 scaled by 1000
    assert torch.allclose(whiten(gen, ref)[1], torch.tensor([[0., 1e3]]), rtol=1e-4)


def test_whitened_independent_group_is_orthonormal_with_identity_on_its_span():
    torch.manual_seed(0)
    gen, ref = torch.randn(4, 12) * torch.linspace(0.1, 10, 12), torch.randn(1, 12)   # badly scaled dimensions
    gw, rw = whiten(gen, ref)
    assert torch.allclose(gw @ gw.T, torch.eye(4), atol=1e-4)
    proj = gw.T @ gw                                                 # the projector onto span(gen)
    assert torch.allclose(proj @ proj, proj, atol=1e-4) and abs(proj.trace().item() - 4) < 1e-3
    assert torch.allclose(gen @ proj, gen, atol=1e-3)                # the group itself lies in the span
    # W is symmetric, so ref W = (W refᵀ)ᵀ; compare with W built the long way, U diag(1/S) Uᵀ
    U, S, _ = torch.linalg.svd(gen.T, full_matrices=False)
    assert torch.allclose(rw, ref @ (U / S) @ U.T, atol=1e-4)


def test_normalise_features_whitens_per_group_and_per_block():
    torch.manual_seed(1)
    gen, ref = torch.randn(2, 3, 4, 8), torch.randn(2, 4, 8)       # (prompts, samples, blocks, features)
    gn, rn = normalise_features(gen, ref, use_whitening=True)
    assert gn.shape == gen.shape and rn.shape == ref.shape
    for p in range(2):
        for b in range(4):
            g1, r1 = whiten(gen[p, :, b], ref[p, b][None])
            assert torch.allclose(gn[p, :, b], g1, atol=1e-5) and torch.allclose(rn[p, b], r1[0], atol=1e-5)


def test_without_whitening_or_with_one_sample_vectors_get_unit_length():
    gen, ref = torch.tensor([[[3., 4.]], [[0., 2.]]]), torch.tensor([[6., 8.], [0., -1.]])
    for use in (False, True):                                        # n = 1: whitening is not possible, scale instead
        gn, rn = normalise_features(gen, ref, use_whitening=use)
        assert torch.allclose(gn, torch.tensor([[[0.6, 0.8]], [[0., 1.]]])) and torch.allclose(rn, torch.tensor([[0.6, 0.8], [0., -1.]]))


# --- rewards ---------------------------------------------------------------------------------------------------

def test_reward_by_hand():
    # cosines with (1, 0): 1 and 0.6 -> alignment 2, 1.2; dot of the samples 0.6 -> diversity 2/(2-1) * 0.6 = 1.2
    out = feature_rewards(torch.tensor([[[1., 0], [0.6, 0.8]]]), torch.tensor([[1., 0]]))
    assert torch.allclose(out.alignment, torch.tensor([[2., 1.2]])) and torch.allclose(out.diversity, torch.tensor([[1.2, 1.2]]))
    assert torch.allclose(out.reward, torch.tensor([[0.8, 0.]]), atol=1e-6)
    assert torch.allclose(out.cfm, torch.tensor([0.2]))              # mean (0.8, 0.4) - (1, 0) = (-0.2, 0.4): 0.04 + 0.16
    out = feature_rewards(torch.tensor([[[1., 0], [0.6, 0.8]]]), torch.tensor([[1., 0]]), alignment_coef=0.5, diversity_coef=3)
    assert torch.allclose(out.reward, torch.tensor([[1 - 3.6, 0.6 - 3.6]]))   # 0.5 * 2 - 3 * 1.2, 0.5 * 1.2 - 3 * 1.2


def test_diversity_averages_over_the_other_samples():
    # samples e1, e2, 2 e1: sums of dots with the others 0 + 2, 0 + 0, 2 + 0 -> times 2 / (3 - 1) = 2, 0, 2
    out = feature_rewards(torch.tensor([[[1., 0], [0., 1], [2., 0]]]), torch.tensor([[0., 3.]]))
    assert torch.allclose(out.diversity, torch.tensor([[2., 0., 2.]]))
    assert torch.allclose(out.alignment, torch.tensor([[0., 2., 0.]]))   # cosines with (0, 3): 0, 1, 0 (length ignored)
    assert torch.allclose(out.cfm, torch.tensor([1 + (1 / 3 - 3) ** 2]))  # mean (1, 1/3) - (0, 3)


def test_one_sample_has_no_diversity_term():
    out = feature_rewards(torch.tensor([[[0.6, 0.8]]]), torch.tensor([[0.6, 0.8]]), diversity_coef=5.)
    assert out.diversity.tolist() == [[0.]] and torch.allclose(out.reward, torch.tensor([[2.]]))
    assert torch.allclose(out.cfm, torch.tensor([0.]))


def test_rewards_carry_block_dimensions():
    torch.manual_seed(2)
    gen, ref = torch.randn(2, 3, 5, 4), torch.randn(2, 5, 4)          # (docs, samples, blocks, features)
    out = feature_rewards(gen, ref)
    assert out.reward.shape == (2, 3, 5) and out.cfm.shape == (2, 5)
    for b in range(5):
        one = feature_rewards(gen[:, :, b], ref[:, b])
        assert torch.allclose(out.reward[:, :, b], one.reward, atol=1e-5) and torch.allclose(out.cfm[:, b], one.cfm, atol=1e-5)


# --- advantages --------------------------------------------------------------------------------------------------

def test_rloo_subtracts_the_mean_of_the_others():
    r = torch.tensor([[1., 2, 3, 6], [0, 0, 4, 0]])
    # row 1: baselines 11/3, 10/3, 9/3, 6/3; row 2: baselines 4/3, 4/3, 0, 4/3
    want = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 0, 4], [-4 / 3, -4 / 3, 4, -4 / 3]])
    assert torch.allclose(advantages(r, "rloo"), want)
    assert torch.allclose(advantages(r, "rloo"), 4 / 3 * (r - r.mean(1, keepdim=True)))   # n/(n-1) (r - mean)


def test_group_norm_standardises_with_the_sample_std():
    r = torch.tensor([[1., 2, 3, 6]])
    # deviations -2, -1, 0, 3; sum of squares 14; std with n - 1: √(14/3)
    want = torch.tensor([[-2., -1, 0, 3]]) / math.sqrt(14 / 3)
    assert torch.allclose(advantages(r, "group_norm"), want) and torch.allclose(advantages(r, "grpo"), want)
    assert advantages(torch.tensor([[2., 2, 2]]), "group_norm").tolist() == [[0., 0., 0.]]   # equal rewards: 0, not NaN


def test_reinforce_and_a_single_sample_use_the_reward_itself():
    r = torch.tensor([[1., -2, 3]])
    assert torch.equal(advantages(r, "reinforce"), r)
    one = torch.tensor([[0.5], [-1.5]])
    for estimator in ADVANTAGE_ESTIMATORS: assert torch.equal(advantages(one, estimator), one)
    with pytest.raises(ValueError, match="ppo"): advantages(r, "ppo")


def test_advantages_compare_along_the_sample_dimension_only():
    r = torch.tensor([[[1., 10.], [3., 30.]]])                       # (1 doc, 2 samples, 2 blocks)
    assert advantages(r, "rloo").tolist() == [[[-2., -20.], [2., 20.]]]   # 1 - 3, 10 - 30; 3 - 1, 30 - 10
