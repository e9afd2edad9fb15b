"""EBFT strided layout (`ftlab.methods.ebft_layout`): anchors, where generated tokens are stored and which position
ids they get, where their log-probabilities are read, the block-parallel mask cell by cell, advantages spread over
step-major storage, and one forward pass with the mask equal to one sequence per block."""
import pytest
import torch
import torch.nn.functional as F
from ftlab.methods.ebft_layout import (anchor_offset, anchor_positions, block_features, generated_slots,
                                       predictor_positions, strided_attention_mask, strided_position_ids,
                                       token_advantages, valid_blocks)

# the running example: a 6-token document, stride 2, blocks of 2 tokens, first anchor at 2 -> anchors 2, 4
S, G = 6, 2
A = torch.tensor([2, 4])


def test_first_anchor_is_context_length_or_past_the_prompt():
    assert anchor_offset(8) == 8
    assert anchor_offset(8, prompt_length=5) == 8                      # the prompt ends before context_length
    assert anchor_offset(8, prompt_length=20) == 20                    # structured data: anchors in the completion
    assert anchor_offset(8, prompt_length=20, min_completion_prefix=3) == 23
    assert anchor_offset(1, min_completion_prefix=4) == 4              # a plain document: counted from its start
    with pytest.raises(ValueError, match="context"): anchor_offset(0)


def test_anchor_positions_keep_every_block_inside_the_document():
    assert anchor_positions(6, 2, 2, 2).tolist() == [2, 4]             # (6 - 2 - 2) // 2 + 1 = 2; block 1 covers 4, 5
    assert anchor_positions(7, 2, 2, 2).tolist() == [2, 4]             # (7 - 4) // 2 + 1 = 2; a third would need 6, 7
    assert anchor_positions(8, 2, 2, 2).tolist() == [2, 4, 6]
    assert anchor_positions(20, 8, 3, 4).tolist() == [8, 11, 14]       # (20 - 4 - 8) // 3 + 1 = 3; last covers 14..17
    assert anchor_positions(4, 2, 2, 2).tolist() == [2] and anchor_positions(3, 2, 2, 2).tolist() == []
    with pytest.raises(ValueError): anchor_positions(6, 2, 0, 2)


def test_valid_blocks_for_right_padded_rows():
    # block 0 covers tokens 2, 3 (needs length >= 4), block 1 covers 4, 5 (needs length >= 6)
    assert valid_blocks(A, G, torch.tensor([6, 5, 4, 3])).tolist() == [[True, True], [True, False], [True, False], [False, False]]


def test_generated_tokens_are_stored_step_major_after_the_document():
    # token t of block b at 6 + 2 t + b: g00 -> 6, g10 -> 7, g01 -> 8, g11 -> 9
    assert generated_slots(S, 2, G).tolist() == [[6, 8], [7, 9]]
    assert generated_slots(10, 3, 2).tolist() == [[10, 13], [11, 14], [12, 15]]


def test_position_ids_are_those_of_the_reference_tokens():
    # g00 stands for token 2, g10 for 4, g01 for 3, g11 for 5
    assert strided_position_ids(S, A, G).tolist() == [0, 1, 2, 3, 4, 5, 2, 4, 3, 5]
    assert strided_position_ids(S, A, G, steps=1).tolist() == [0, 1, 2, 3, 4, 5, 2, 4]
    assert strided_position_ids(S, A, G, steps=0).tolist() == [0, 1, 2, 3, 4, 5]


def test_predictors_are_the_token_before_in_the_same_block():
    # g00 from d1 (anchor 2 - 1), g10 from d3; g01 from g00 (slot 6), g11 from g10 (slot 7)
    assert predictor_positions(S, A, G).tolist() == [[1, 6], [3, 7]]
    # three steps: the third token of a block from the second, two slots further on per step
    assert predictor_positions(S, A, 3).tolist() == [[1, 6, 8], [3, 7, 9]]


def test_block_mask_cell_by_cell():
    x, o = True, False
    want = [  # keys:  d0 d1 d2 d3 d4 d5 g00 g10 g01 g11
        [x, o, o, o, o, o, o, o, o, o],   # d0   the document is causal ...
        [x, x, o, o, o, o, o, o, o, o],   # d1
        [x, x, x, o, o, o, o, o, o, o],   # d2
        [x, x, x, x, o, o, o, o, o, o],   # d3
        [x, x, x, x, x, o, o, o, o, o],   # d4
        [x, x, x, x, x, x, o, o, o, o],   # d5   ... and sees no generated token
        [x, x, o, o, o, o, x, o, o, o],   # g00  d0 d1 (before anchor 2), itself
        [x, x, x, x, o, o, o, x, o, o],   # g10  d0..d3 (before anchor 4), itself; not g00
        [x, x, o, o, o, o, x, o, x, o],   # g01  d0 d1, g00, itself; not g10
        [x, x, x, x, o, o, o, x, o, x],   # g11  d0..d3, g10, itself; not g00 or g01
    ]
    mask = strided_attention_mask(S, A, G)
    assert mask.dtype == torch.bool and mask.tolist() == want


def test_generation_masks_are_leading_squares_of_the_full_mask():
    a = anchor_positions(11, 3, 2, 3)                                   # anchors 3, 5, 7
    full = strided_attention_mask(11, a, 3)
    assert full.shape == (11 + 3 * 3,) * 2
    for steps in range(3):
        n = 11 + steps * 3
        assert torch.equal(strided_attention_mask(11, a, 3, steps=steps), full[:n, :n])
    assert torch.equal(strided_attention_mask(11, a, 3, steps=0), torch.ones(11, 11, dtype=torch.bool).tril())


def test_block_advantages_follow_step_major_storage():
    # slots after the document: g00 g10 g01 g11 -> A0 A1 A0 A1 (not A0 A0 A1 A1)
    assert token_advantages(torch.tensor([10., 20.]), G).tolist() == [10., 20., 10., 20.]
    adv = torch.tensor([[1., 2., 3.], [4., 5., 6.]])                    # 2 samples, 3 blocks, 2 steps
    assert token_advantages(adv, 2).tolist() == [[1., 2., 3., 1., 2., 3.], [4., 5., 6., 4., 5., 6.]]
    slots = generated_slots(S, 2, G) - S                                # each token gets its own block's value
    tok = token_advantages(torch.tensor([10., 20.]), G)
    assert all(tok[slots[b, t]] == [10., 20.][b] for b in range(2) for t in range(G))


def test_block_features_pair_each_block_with_the_tokens_it_stands_for():
    feats = torch.arange(20.).view(2, 10, 1)                            # row r, slot i -> 10 r + i
    gen, ref = block_features(feats, S, A, G)
    assert gen.shape == ref.shape == (2, 2, 2, 1)
    assert gen[0, ..., 0].tolist() == [[6., 8.], [7., 9.]] and ref[0, ..., 0].tolist() == [[2., 3.], [4., 5.]]
    assert gen[1, ..., 0].tolist() == [[16., 18.], [17., 19.]]


def _toy(ids, pos, mask, seed=0):
    "Hidden states of a two-layer attention-only model with learned positions (deterministic per seed)."
    g = torch.Generator().manual_seed(seed)
    emb, pos_emb = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
    x = emb[ids] + pos_emb[pos]
    for _ in range(2):
        w = torch.randn(3, 8, 8, generator=g) / 8 ** 0.5
        x = x + F.scaled_dot_product_attention((x @ w[0])[None], (x @ w[1])[None], (x @ w[2])[None], attn_mask=mask)[0]
    return x


@pytest.mark.parametrize("seq_len,offset,stride,gen_len", [(6, 2, 2, 2), (13, 3, 2, 3), (12, 4, 3, 1)])
def test_one_pass_equals_one_sequence_per_block(seq_len, offset, stride, gen_len):
    torch.manual_seed(seq_len)
    a = anchor_positions(seq_len, offset, stride, gen_len)
    B = len(a)
    doc, blocks = torch.randint(32, (seq_len,)), torch.randint(32, (B, gen_len))
    slots, pred = generated_slots(seq_len, B, gen_len), predictor_positions(seq_len, a, gen_len)
    full = torch.cat([doc, torch.zeros(B * gen_len, dtype=torch.long)])
    full[slots] = blocks
    out = _toy(full, strided_position_ids(seq_len, a, gen_len), strided_attention_mask(seq_len, a, gen_len))
    wrong = 0
    for b in range(B):
        for t in range(gen_len):
            seq = torch.cat([doc[:a[b]], blocks[b, :t + 1]])      # the block as the continuation of its own prefix
            alone = _toy(seq, torch.arange(len(seq)), torch.ones(len(seq), len(seq), dtype=torch.bool).tril())
            assert torch.allclose(out[slots[b, t]], alone[-1], atol=1e-5)
            assert torch.allclose(out[pred[b, t]], alone[-2], atol=1e-5)
            wrong += not torch.allclose(out[slots[b, t] - 1], alone[-2], atol=1e-5)
    assert wrong > 0                                               # the plain shift by one reads other blocks' states
