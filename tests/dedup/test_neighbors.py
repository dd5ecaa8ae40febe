"""Near-duplicate search: recall of IVF and SemDeDup against brute force on planted duplicates, precision 1,
grouping, blocking and the pure helpers."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipeline.dedup import neighbors as nb
from pipeline.dedup import semdedup as sd
from tests.support.helpers import random_unit

THRESHOLD = 0.95


def planted(
    n: int, d: int, groups: int, distractors: int, seed: int = 0
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Random unit vectors with `groups` planted duplicate groups (2-6 members at cosine 0.975-0.995 of a centre
    member, so members are ~0.95-0.99 of each other) and `distractors` pairs at cosine 0.90-0.93 (similar, not
    duplicates). Returns (x, member ids of each group, distractor (centre, copy) pairs)."""
    rng = np.random.default_rng(seed)
    x = random_unit(n, d, seed)
    sizes = rng.integers(2, 7, groups)
    perm = rng.permutation(n)
    cut = np.cumsum(sizes)
    members = np.split(perm[: cut[-1]], cut[:-1])
    rest = perm[cut[-1] : cut[-1] + 2 * distractors].reshape(-1, 2)

    def place(rows: np.ndarray, centres: np.ndarray, lo: float, hi: float) -> None:
        c = x[centres]
        u = rng.standard_normal((len(rows), d)).astype(np.float32)
        u -= (u * c).sum(1, keepdims=True) * c
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        a = rng.uniform(lo, hi, (len(rows), 1)).astype(np.float32)
        x[rows] = a * c + np.sqrt(1 - a * a) * u

    place(
        np.concatenate([m[1:] for m in members]),
        np.concatenate([np.repeat(m[0], len(m) - 1) for m in members]),
        0.975,
        0.995,
    )
    place(rest[:, 1], rest[:, 0], 0.90, 0.93)
    return x, members, rest


def brute_force_pairs(x: np.ndarray, threshold: float) -> nb.Pairs:
    """All pairs at or above threshold, independently of the module: faiss range search plus an exact recheck."""
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, ids = index.range_search(x, threshold - 0.01)
    q = np.repeat(np.arange(len(x)), np.diff(lims).astype(np.int64))
    sim = np.einsum("ij,ij->i", x[q], x[ids])
    keep = (sim >= threshold) & (q < ids)
    return nb.Pairs(q[keep].astype(np.int64), ids[keep].astype(np.int64), sim[keep])


@pytest.fixture(scope="module")
def data() -> dict:
    x, members, distractors = planted(10_000, 256, groups=400, distractors=400, seed=3)
    return {"x": x, "members": members, "distractors": distractors, "truth": brute_force_pairs(x, THRESHOLD)}


def _precision(found: nb.Pairs, truth: nb.Pairs, n: int) -> float:
    return float(np.isin(found.keys(n), truth.keys(n)).mean())


@pytest.mark.slow
def test_recall_and_precision_against_brute_force(data: dict) -> None:
    x, truth, n = data["x"], data["truth"], len(data["x"])
    vs = nb.ArrayVectors(x)
    assert len(truth) > 1500  # the planted groups are found by brute force: the yardstick is meaningful
    results = {
        "exact": nb.search_exact(vs, THRESHOLD, k=16),
        "ivf": nb.search_ivf(vs, THRESHOLD, k=16, truth=nb.sample_truth(vs, THRESHOLD)),
        "semdedup": sd.search_semdedup(vs, THRESHOLD),
    }
    for method, r in results.items():
        recall = nb.pair_recall(r.pairs, truth, n)
        assert _precision(r.pairs, truth, n) == 1.0, method
        assert recall is not None and recall >= (1.0 if method == "exact" else 0.98), (method, recall)
        assert (r.pairs.sim >= THRESHOLD).all()
        labels = nb.connected_components(n, r.pairs.a, r.pairs.b)
        # distractors (0.90-0.93) are never joined to their centre
        assert not (labels[data["distractors"][:, 0]] == labels[data["distractors"][:, 1]]).any(), method
        # planted groups come out whole
        whole = np.mean([len(set(labels[m])) == 1 for m in data["members"]])
        assert whole >= 0.98, (method, whole)
    est = nb.recall_report(results["semdedup"].pairs, nb.sample_truth(vs, THRESHOLD, seed=1), n)
    assert est["recall_sample_pairs"] > 0 and est["recall_estimate"] >= 0.95


def test_exact_search_recall_one_on_small_set() -> None:
    x, members, _ = planted(3000, 64, groups=100, distractors=100, seed=1)
    truth = brute_force_pairs(x, THRESHOLD)
    r = nb.search_exact(nb.ArrayVectors(x), THRESHOLD, k=16)
    assert nb.pair_recall(r.pairs, truth, len(x)) == 1.0
    assert _precision(r.pairs, truth, len(x)) == 1.0
    # nearest-neighbour similarity of a planted member is its best in-group similarity
    m = members[0]
    assert r.nn_sim[m[0]] == pytest.approx(max(x[m[0]] @ x[j] for j in m[1:]), abs=1e-5)


def test_ivf_tunes_nprobe_up_to_target() -> None:
    x, _, _ = planted(6000, 64, groups=300, distractors=100, seed=2)
    vs = nb.ArrayVectors(x)
    index = nb.build_ivf(vs, nb.ivf_nlist(len(x)))
    truth = nb.sample_truth(vs, THRESHOLD, sample=2000)
    nprobe, recall = nb.tune_nprobe(
        index, nb.ivf_nlist(len(x)), vs, truth, k=16, threshold=THRESHOLD, target=0.999, start=1
    )
    assert recall is not None and (recall >= 0.999 or nprobe == nb.ivf_nlist(len(x)))


def test_semdedup_on_disk_matches_in_memory(tmp_path) -> None:
    x, _, _ = planted(4000, 64, groups=200, distractors=50, seed=4)
    vs = nb.ArrayVectors(x)
    mem = sd.search_semdedup(vs, THRESHOLD, n_clusters=20)
    disk = sd.search_semdedup(vs, THRESHOLD, n_clusters=20, workdir=str(tmp_path))
    assert np.array_equal(mem.pairs.keys(len(x)), disk.pairs.keys(len(x)))
    assert disk.params["clusters"] == 20 and disk.params["tuning_pairs"] > 200 and len(disk.pairs) > 200


def test_spill_is_tuned_on_the_sample() -> None:
    # labels: vector -> its 3 nearest clusters; true pairs (0,1) meet at once, (2,3) only with spill 2, (4,5) with 3
    labels = np.array([[0, 1, 2], [0, 2, 1], [1, 2, 0], [2, 1, 0], [3, 4, 5], [5, 0, 3]])
    truth = nb.Truth(np.arange(6), nb.Pairs(np.array([0, 2, 4]), np.array([1, 3, 5]), np.ones(3, np.float32)))
    assert sd.tune_spill(labels, truth, target=0.6) == (2, pytest.approx(2 / 3))
    assert sd.tune_spill(labels, truth, target=0.99) == (3, 1.0)
    assert sd.tune_spill(labels, nb.Truth(np.arange(6), nb.Pairs()), 0.99) == (sd.DEFAULT_SPILL, None)


def test_cluster_pairs_blocked_equals_brute_force() -> None:
    x = random_unit(300, 16, seed=5)
    x[100:110] = x[0] + 0.01 * random_unit(10, 16, seed=6)
    ids = np.arange(1000, 1300)
    x = nb.normalize_rows(x)
    pairs, nn = sd.cluster_pairs(ids, x.astype(np.float16), 0.9, max_cells=300 * 7)  # forces 7-row blocks
    sims = x.astype(np.float16).astype(np.float32) @ x.astype(np.float16).astype(np.float32).T
    np.fill_diagonal(sims, -np.inf)
    r, c = np.nonzero(np.triu(sims >= 0.9, 1))
    assert set(zip(pairs.a.tolist(), pairs.b.tolist())) == set(zip((ids[r]).tolist(), (ids[c]).tolist()))
    np.testing.assert_allclose(nn, sims.max(axis=1), atol=1e-6)


def test_cluster_pairs_compares_guests_with_members_only() -> None:
    x = random_unit(6, 16, seed=8)
    x[3] = x[0]  # member-guest copy: found
    x[5] = x[4]  # guest-guest copy: left to the guests' own clusters
    pairs, nn = sd.cluster_pairs(np.arange(10, 16), x, 0.95, members=3)
    assert list(zip(pairs.a.tolist(), pairs.b.tolist())) == [(10, 13)]
    assert nn[0] == pytest.approx(1.0) and nn[3] == pytest.approx(1.0) and nn[4] < 0.95


def _naive_components(n: int, edges: list[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_connected_components_matches_naive_union_find(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 500
    a, b = rng.integers(0, n, 400), rng.integers(0, n, 400)
    # a long chain forces many hooking rounds
    a = np.concatenate([a, np.arange(100, 199)])
    b = np.concatenate([b, np.arange(101, 200)])
    got = nb.connected_components(n, a, b)
    assert got.tolist() == _naive_components(n, list(zip(a.tolist(), b.tolist())))


def test_pairs_canonical_orders_and_dedups() -> None:
    p = nb.Pairs.canonical(np.array([3, 1, 2, 5]), np.array([1, 3, 2, 4]), np.array([0.9, 0.8, 1.0, 0.7]))
    assert list(zip(p.a.tolist(), p.b.tolist())) == [(1, 3), (4, 5)]
    assert p.sim.tolist() == pytest.approx([0.9, 0.7])


def test_verify_drops_candidates_below_threshold() -> None:
    x = random_unit(4, 8, seed=0)
    x[1] = x[0]
    cand = nb.Pairs(np.array([0, 0]), np.array([1, 2]), np.array([0.99, 0.99], np.float32))  # second is a lie
    out = nb.verify_pairs(nb.ArrayVectors(x), cand, 0.95)
    assert list(zip(out.a.tolist(), out.b.tolist())) == [(0, 1)] and out.sim[0] == pytest.approx(1.0)


def test_zero_vectors_never_match() -> None:
    x = np.zeros((3, 8), np.float32)
    ok, sim = nb.verify(nb.ArrayVectors(x), np.array([0]), nb.ArrayVectors(x), np.array([1]), -0.5)
    assert not ok[0] and np.isnan(sim[0])
