import numpy as np
import pytest

from pipeline.faiss_index import IndexConfig, build_index, search


def _vectors(n, d=16, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_equals_brute_force_in_batches():
    p, q = _vectors(500), _vectors(37, seed=1)
    scores, indices = search(build_index(p), q, k=10, batch_size=8)
    expected = np.argsort(-(q @ p.T), axis=1)[:, :10]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ p.T, expected, axis=1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_find_most_true_neighbours(kind):
    p, q = _vectors(2000), _vectors(50, seed=1)
    exact = search(build_index(p), q, k=10)[1]
    approx = search(build_index(p, IndexConfig(kind=kind, ivf_nlist=16, ivf_nprobe=8)), q, k=10)[1]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert overlap > 0.9


def test_k_is_capped_at_corpus_size_and_unknown_kind_fails():
    assert search(build_index(_vectors(3)), _vectors(2), k=100)[1].shape == (2, 3)
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(_vectors(3), IndexConfig(kind="lsh"))
