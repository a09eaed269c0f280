import torch

from models.scoring import dot, maxsim, maxsim_paired, token_similarities


def random_tokens(n, max_len, dim, generator, min_len=1):
    """Token vectors with garbage (large values) at padded positions, and their masks."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    mask = torch.arange(max_len) < lengths[:, None]  # (n, L)
    tokens = torch.randn(n, max_len, dim, generator=generator)
    garbage = 1e4 * torch.rand(n, max_len, dim, generator=generator)
    return torch.where(mask[..., None], tokens, garbage), mask


def loop_maxsim(q_tokens, q_mask, p_tokens, p_mask):
    """Plain reference: sum over real query tokens of the max over real passage tokens."""
    scores = torch.zeros(len(q_tokens), len(p_tokens), dtype=torch.float64)
    for a in range(len(q_tokens)):
        for b in range(len(p_tokens)):
            q = q_tokens[a][q_mask[a]].double()
            p = p_tokens[b][p_mask[b]].double()
            if len(p):
                scores[a, b] = sum(max(float(qi @ pj) for pj in p) for qi in q)
    return scores


def test_dot_matches_loop():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    expected = torch.tensor([[float(q[a] @ p[b]) for b in range(5)] for a in range(3)])
    torch.testing.assert_close(dot(q, p), expected)


def test_token_similarities_matches_loop():
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    sims = token_similarities(q, p)
    assert sims.shape == (2, 3, 5)
    torch.testing.assert_close(sims[1, 2, 4], q[1, 2] @ p[1, 4])


def test_maxsim_matches_loop_for_every_chunk_size():
    g = torch.Generator().manual_seed(2)
    q_tokens, q_mask = random_tokens(3, 4, 8, g)
    p_tokens, p_mask = random_tokens(5, 6, 8, g)
    expected = loop_maxsim(q_tokens, q_mask, p_tokens, p_mask).float()
    for chunk_size in (1, 2, 5, 64):
        scores = maxsim(q_tokens, q_mask, p_tokens, p_mask, chunk_size=chunk_size)
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)


def test_padded_passage_tokens_never_win_even_when_all_real_sims_are_negative():
    q = torch.tensor([[[1.0, 0.0]]])
    p = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]])  # a zero pad would win the max if not masked
    mask = torch.tensor([[True, False]])
    assert maxsim(q, torch.tensor([[True]]), p, mask).item() == -1.0
    assert maxsim_paired(q, torch.tensor([[True]]), p, mask).item() == -1.0


def test_passage_without_real_tokens_scores_zero():
    q = torch.ones(1, 2, 3)
    p = torch.ones(2, 4, 3)
    p_mask = torch.tensor([[True, False, False, False], [False] * 4])
    scores = maxsim(q, torch.ones(1, 2, dtype=torch.bool), p, p_mask)
    torch.testing.assert_close(scores, torch.tensor([[6.0, 0.0]]))


def test_maxsim_paired_is_the_diagonal_of_maxsim():
    g = torch.Generator().manual_seed(3)
    q_tokens, q_mask = random_tokens(4, 5, 8, g)
    p_tokens, p_mask = random_tokens(4, 7, 8, g)
    full = maxsim(q_tokens, q_mask, p_tokens, p_mask, chunk_size=3)
    torch.testing.assert_close(maxsim_paired(q_tokens, q_mask, p_tokens, p_mask), full.diagonal())


def test_chunked_gradients_equal_unchunked():
    g = torch.Generator().manual_seed(4)
    q_tokens, q_mask = random_tokens(2, 3, 4, g)
    p_tokens, p_mask = random_tokens(5, 4, 4, g)
    grads = []
    for chunk_size in (1, 64):
        q = q_tokens.clone().requires_grad_()
        p = p_tokens.clone().requires_grad_()
        maxsim(q, q_mask, p, p_mask, chunk_size=chunk_size).square().sum().backward()
        grads.append((q.grad, p.grad))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][1][~p_mask].abs().sum() == 0
    assert grads[0][0][~q_mask].abs().sum() == 0
