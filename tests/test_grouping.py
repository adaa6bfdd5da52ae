"""Expert grouping: sizes, permutations, determinism, k-means quality and bad input."""

import pytest
import torch

from lte.conversion.grouping import cluster_quality, expert_sizes, group_neurons
from lte.errors import LTEError

METHODS = ["kmeans", "random", "contiguous"]


def planted_features(sizes: list[int], D: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features around len(sizes) random directions, cluster c with sizes[c] members, shuffled.

    Returns (features [F, D], planted cluster of each neuron [F]).
    """
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(sizes), D, generator=gen)  # [E, D]
    truth = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # [F]
    shuffle = torch.randperm(truth.numel(), generator=gen)
    truth = truth[shuffle]
    scale = torch.rand(truth.numel(), 1, generator=gen) + 0.5  # norms must not matter
    features = scale * (directions[truth] + noise * torch.randn(truth.numel(), D, generator=gen))
    return features, truth


def blocks(perm: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The old neuron indices of each expert."""
    return list(torch.split(perm, sizes))


@pytest.mark.parametrize(
    ("F", "S", "expected"),
    [(100, 32, [32, 32, 32, 4]), (96, 32, [32, 32, 32]), (7, 7, [7]), (7, 1, [1] * 7), (33, 32, [32, 1])],
)
def test_expert_sizes(F, S, expected):
    assert expert_sizes(F, S) == expected


@pytest.mark.parametrize("S", [0, -3, 101])
def test_expert_sizes_rejects_bad_size(S):
    with pytest.raises(ValueError, match="expert"):
        expert_sizes(100, S)


def test_expert_size_larger_than_width_message():
    with pytest.raises(LTEError, match=r"larger than the FFN width F=100; choose expert_size <= F"):
        group_neurons(torch.randn(100, 8), expert_size=128)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("F", "S"), [(100, 32), (64, 16), (37, 5), (12, 12)])
def test_result_is_a_permutation(method, F, S):
    perm = group_neurons(torch.randn(F, 24), S, method=method, seed=3)
    assert perm.dtype == torch.int64
    assert perm.shape == (F,)
    assert torch.equal(torch.sort(perm).values, torch.arange(F))


def test_contiguous_is_identity():
    assert torch.equal(group_neurons(torch.randn(50, 8), 16, method="contiguous"), torch.arange(50))


@pytest.mark.parametrize("method", ["kmeans", "random"])
def test_deterministic_and_independent_of_global_rng(method):
    features = torch.randn(90, 20)
    torch.manual_seed(1)
    first = group_neurons(features, 8, method=method, seed=5)
    torch.manual_seed(12345)
    second = group_neurons(features, 8, method=method, seed=5)
    assert torch.equal(first, second)
    # grouping must not consume the global generator
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    group_neurons(features, 8, method=method, seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("method", ["kmeans", "random"])
def test_different_seeds_differ(method):
    features = torch.randn(90, 20)
    assert not torch.equal(
        group_neurons(features, 8, method=method, seed=0), group_neurons(features, 8, method=method, seed=1)
    )


@pytest.mark.parametrize(
    ("F", "S", "D"),
    [(96, 16, 32), (100, 32, 64), (45, 8, 24), (31, 5, 200)],  # D=200 exercises the seeding projection
)
def test_kmeans_recovers_planted_clusters(F, S, D):
    sizes = expert_sizes(F, S)
    features, truth = planted_features(sizes, D=D, noise=0.05, seed=F)
    perm = group_neurons(features, S, method="kmeans", seed=0)
    for expert, members in enumerate(blocks(perm, sizes)):
        planted = truth[members]
        assert (planted == planted[0]).all(), f"expert {expert} mixes planted clusters {planted.tolist()}"
    # every planted cluster is found (sizes match, so blocks <-> clusters is a bijection)
    assert sorted(truth[b[0]].item() for b in blocks(perm, sizes)) == list(range(len(sizes)))


def test_kmeans_beats_random_and_contiguous():
    sizes = expert_sizes(150, 16)
    features, _ = planted_features(sizes, D=48, noise=1.0, seed=0)  # noisy: clusters overlap
    quality = {
        method: cluster_quality(features, group_neurons(features, 16, method=method, seed=0), sizes)
        for method in METHODS
    }
    assert quality["kmeans"] > quality["random"] + 0.1
    assert quality["kmeans"] > quality["contiguous"] + 0.1


def test_kmeans_handles_duplicate_and_zero_features():
    features = torch.cat([torch.ones(20, 6), torch.zeros(10, 6), torch.randn(13, 6)])
    perm = group_neurons(features, 8, method="kmeans")
    assert torch.equal(torch.sort(perm).values, torch.arange(43))


def test_low_precision_features_are_accepted():
    sizes = expert_sizes(64, 16)
    features, truth = planted_features(sizes, D=32, noise=0.05, seed=1)
    perm = group_neurons(features.to(torch.bfloat16), 16)
    for members in blocks(perm, sizes):
        assert (truth[members] == truth[members[0]]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rejects_non_finite_features(bad):
    features = torch.randn(40, 8)
    features[3, 2] = bad
    with pytest.raises(LTEError, match="NaN or inf"):
        group_neurons(features, 8)


def test_rejects_unknown_method():
    with pytest.raises(LTEError, match="kmeans, random, contiguous"):
        group_neurons(torch.randn(40, 8), 8, method="spectral")


@pytest.mark.parametrize("shape", [(40,), (2, 40, 8)])
def test_rejects_wrong_ndim(shape):
    with pytest.raises(LTEError, match="2-D"):
        group_neurons(torch.randn(*shape), 8)


def test_cluster_quality_checks_lengths():
    with pytest.raises(LTEError, match="must all match"):
        cluster_quality(torch.randn(10, 4), torch.arange(10), [4, 4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kmeans_on_gpu_matches_planted_clusters():
    sizes = expert_sizes(100, 32)
    features, truth = planted_features(sizes, D=64, noise=0.05, seed=2)
    perm = group_neurons(features.cuda(), 32, seed=0)
    assert perm.device.type == "cuda"
    assert torch.equal(perm, group_neurons(features.cuda(), 32, seed=0))
    for members in blocks(perm.cpu(), sizes):
        assert (truth[members] == truth[members[0]]).all()
