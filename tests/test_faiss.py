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


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_vectors_read_from_shards_on_disk_build_the_index_the_array_builds(kind, tmp_path):
    """Shards in another row order (as processes write them), read back in corpus order; IVF samples its
    training rows (1,000 > 256 per list x 2 lists) the same way from both."""
    from pipeline.evaluate import VectorShards

    p, q = _vectors(1000), _vectors(30, seed=1)
    rows = np.random.default_rng(2).permutation(len(p))  # position -> corpus row, over the shards in order
    np.save(tmp_path / "rank-0.npy", p[rows[:600]])
    np.save(tmp_path / "rank-1.npy", p[rows[600:]])
    shards = VectorShards([tmp_path / "rank-0.npy", tmp_path / "rank-1.npy"], rows)
    np.testing.assert_array_equal(shards[:], p)
    config = IndexConfig(kind=kind, ivf_nlist=2, ivf_nprobe=1)
    (array_scores, array_ids), (shard_scores, shard_ids) = (search(build_index(x, config), q, k=20) for x in (p, shards))
    np.testing.assert_array_equal(shard_ids, array_ids)
    np.testing.assert_array_equal(shard_scores, array_scores)
