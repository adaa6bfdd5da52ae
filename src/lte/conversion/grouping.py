"""Grouping the F neurons of an FFN into experts of S neurons (method.md section 1).

The result is a permutation `perm` [F] (int64): new neuron j is old neuron perm[j], and after
permuting, expert e owns the contiguous block of neurons [e*S, min((e+1)*S, F)).

Policy for F not divisible by S: E = ceil(F / S) experts, all of size S except the last, which
holds the F - S*(E-1) leftover neurons.

Methods
- "kmeans": balanced spherical k-means on L2-normalised features (the gate / W1 rows). Every
  cluster gets exactly its capacity. Seeding is k-means++ on a seeded random projection of the
  features (cheap even for D=4096); each iteration scores all neurons against all centroids with
  one matmul, assigns them under the capacities (rounds of proposals, see `_balanced_assign`)
  and recomputes the centroids. It stops after `n_iter` iterations or when nothing changes.
- "random": a seeded random permutation.
- "contiguous": the identity (neurons keep their order).

All randomness comes from a local `torch.Generator` seeded with `seed`, so the global RNG
state neither influences nor is changed by grouping.
"""

from __future__ import annotations

import math

import torch

from ..errors import LTEError

METHODS = ("kmeans", "random", "contiguous")

# Width of the random projection used only for k-means++ seeding.
_SEED_PROJ_DIM = 128


def expert_sizes(F: int, S: int) -> list[int]:
    """Sizes of the E = ceil(F / S) experts: S each, the last one smaller when S does not divide F."""
    if F < 1:
        raise LTEError(f"the FFN width F must be at least 1, got F={F}")
    if S < 1:
        raise LTEError(f"expert size S must be at least 1, got S={S}; choose expert_size >= 1")
    if S > F:
        raise LTEError(f"expert size S={S} is larger than the FFN width F={F}; choose expert_size <= F")
    E = math.ceil(F / S)
    return [S] * (E - 1) + [F - S * (E - 1)]


def group_neurons(
    features: torch.Tensor,
    expert_size: int,
    method: str = "kmeans",
    seed: int = 0,
    n_iter: int = 15,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return perm [F] (int64, on the features' device) grouping neurons into experts.

    features: [F, D], one feature vector per neuron (row j of the gate / W1 weight).
    expert_size: S, the number of neurons per expert (see `expert_sizes` for the last one).
    method: "kmeans", "random" or "contiguous".
    seed: seed of the local generator (same seed, same permutation).
    n_iter: maximum number of k-means iterations.
    device: where to compute (default: the features' device); the result is returned there.
    """
    if method not in METHODS:
        raise LTEError(f"unknown grouping method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise LTEError(f"features must be a 2-D tensor [F neurons, D], got {shape}")
    F, D = features.shape
    if D < 1:
        raise LTEError(
            f"features have no columns (shape {tuple(features.shape)}); expected [F, D] with D >= 1"
        )
    sizes = expert_sizes(F, expert_size)
    if n_iter < 0:
        raise LTEError(f"n_iter must be >= 0, got {n_iter}")
    device = torch.device(device) if device is not None else features.device
    X = features.detach().to(device=device, dtype=torch.float32)
    if not torch.isfinite(X).all():
        raise LTEError(
            "features contain NaN or inf values; the FFN weights are broken. "
            "Check the checkpoint (or the training run that produced it) before grouping."
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)

    if method == "contiguous" or len(sizes) == 1:
        return torch.arange(F, dtype=torch.int64, device=device)
    if method == "random":
        return torch.randperm(F, generator=gen).to(device)
    perm, _ = balanced_kmeans(X, sizes, gen, n_iter)
    return perm


def cluster_quality(features: torch.Tensor, perm: torch.Tensor, sizes: list[int]) -> float:
    """Mean cosine similarity of each neuron to its expert's centroid (higher is tighter).

    The centroid of an expert is the mean of its members' L2-normalised features.
    """
    X = torch.nn.functional.normalize(features.detach().float(), dim=1)  # [F, D]
    if perm.numel() != X.shape[0] or sum(sizes) != X.shape[0]:
        raise LTEError(
            f"perm has {perm.numel()} entries and sizes sum to {sum(sizes)}, "
            f"but there are {X.shape[0]} features; they must all match"
        )
    labels = _labels_from_sizes(sizes, X.device)  # [F] expert of each new position
    Xp = X.index_select(0, perm.to(X.device))  # [F, D] in the grouped order
    centroids = torch.nn.functional.normalize(_cluster_sums(Xp, labels, len(sizes)), dim=1)  # [E, D]
    cos = (Xp * centroids.index_select(0, labels)).sum(1)  # [F]
    return cos.mean().item()


# ----------------------------------------------------------------------------- k-means internals


def _labels_from_sizes(sizes: list[int], device: torch.device) -> torch.Tensor:
    """[F] expert index of each position when experts are consecutive blocks of `sizes`."""
    return torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
    )


def _cluster_sums(X: torch.Tensor, labels: torch.Tensor, E: int) -> torch.Tensor:
    """Sum of the rows of X [F, D] per label -> [E, D].

    index_add_ is fast and deterministic on CPU; on GPUs it uses atomics (run-to-run noise), so
    there a one-hot [E, F] matmul keeps the result deterministic.
    """
    if X.device.type == "cpu":
        return torch.zeros(E, X.shape[1], dtype=X.dtype).index_add_(0, labels, X)
    one_hot = torch.zeros(E, X.shape[0], dtype=X.dtype, device=X.device)  # [E, F]
    one_hot[labels, torch.arange(X.shape[0], device=X.device)] = 1.0
    return one_hot @ X


def _kmeans_pp_seeds(X: torch.Tensor, E: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: E distinct neuron indices, chosen on a random projection of X.

    X [F, D] is L2-normalised. Projecting to at most _SEED_PROJ_DIM dimensions keeps cosine
    geometry roughly intact and makes the E sequential seeding steps cheap. The random numbers
    are drawn up front from the CPU generator and the loop has no host-device syncs, so it is
    also fast on a GPU.
    """
    F, D = X.shape
    device = X.device
    if D > _SEED_PROJ_DIM:
        proj = torch.randn(D, _SEED_PROJ_DIM, generator=gen).to(device)  # [D, P]
        Z = torch.nn.functional.normalize(X @ proj, dim=1)  # [F, P]
    else:
        Z = X
    Zt = Z.T.contiguous()  # [P, F]: a row vector times Zt is the fastest mat-vec on CPU
    first = torch.randint(F, (1,), generator=gen).to(device)
    uniforms = torch.rand(E, generator=gen, dtype=torch.float64).to(device)  # [E] in [0, 1)
    chosen = torch.empty(E, dtype=torch.int64, device=device)
    taken = torch.zeros(F, dtype=torch.bool, device=device)
    dist = torch.zeros(F, device=device)  # [F] squared distance to the nearest seed
    positions = torch.arange(F, device=device)
    for e in range(E):
        if e == 0:
            i = first
        else:
            # Draw i with probability dist[i] / sum(dist); if every unchosen point coincides with
            # a seed (sum 0), draw uniformly among the unchosen ones instead.
            weights = torch.where(dist.sum() > 0, dist, (~taken).float()).double()  # [F]
            cdf = torch.cumsum(weights, 0)  # [F]
            u = uniforms[e : e + 1] * cdf[-1:]
            i = torch.searchsorted(cdf, u, right=True)  # first index with cdf > u: positive weight
            last_drawable = torch.where(weights > 0, positions, -1).max().reshape(1)
            i = torch.minimum(i, last_drawable)  # u rounded up to cdf[-1]: take the last one
        chosen[e : e + 1] = i
        taken[i] = True
        d_new = (2.0 - 2.0 * (Zt[:, i].T @ Zt)).clamp_min(0.0).flatten()  # [F]
        dist = d_new if e == 0 else torch.minimum(dist, d_new)
        dist[i] = 0.0
    return chosen


def _balanced_assign(sim: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Assign each of F neurons to one of E clusters, cluster e taking exactly capacity[e].

    sim [F, E]: similarity of every neuron to every centroid; capacity [E] sums to F.
    Rounds of proposals: every unassigned neuron proposes to its most similar cluster that still
    has room; each cluster accepts its best proposers up to its remaining room and rejects the
    rest, who propose again next round. Each round fills at least one cluster or ends the
    assignment, so there are at most E + 1 rounds; everything inside a round is vectorised.
    Returns labels [F] (int64).
    """
    F, E = sim.shape
    device = sim.device
    labels = torch.full((F,), -1, dtype=torch.int64, device=device)
    room = capacity.clone()  # [E] places left per cluster
    pending = torch.arange(F, device=device)  # [U] neurons still without a cluster
    full = torch.zeros(E, dtype=torch.bool, device=device)
    while pending.numel() > 0:
        scores = sim.index_select(0, pending).masked_fill_(full, float("-inf"))  # [U, E]
        best_score, best = scores.max(dim=1)  # [U]
        # Group proposals by cluster, best proposer first (two stable sorts: score, then cluster).
        order = torch.argsort(best_score, descending=True, stable=True)
        order = order[torch.argsort(best[order], stable=True)]
        cluster = best[order]  # [U] non-decreasing
        counts = torch.bincount(cluster, minlength=E)  # [E] proposals per cluster
        first = torch.cumsum(counts, 0) - counts  # [E] position of each cluster's first proposal
        rank = torch.arange(order.numel(), device=device) - first[cluster]  # [U] rank in its cluster
        accept = rank < room[cluster]
        labels[pending[order[accept]]] = cluster[accept]
        room -= torch.bincount(cluster[accept], minlength=E)
        full = room == 0
        pending = pending[order[~accept]]
    return labels


def _capacities(sim: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Capacity [E] of each centroid: S for all, the smaller last size for one of them.

    When S does not divide F, the short expert goes to the centroid that the fewest neurons
    prefer (unconstrained argmax), so a naturally small cluster can be recovered whole.
    """
    E = len(sizes)
    capacity = torch.full((E,), sizes[0], dtype=torch.int64, device=sim.device)
    if sizes[-1] != sizes[0]:
        natural = torch.bincount(sim.argmax(dim=1), minlength=E)  # [E]
        capacity[torch.argmin(natural)] = sizes[-1]  # argmin returns the first minimum: deterministic
    return capacity


def balanced_kmeans(
    X: torch.Tensor, sizes: list[int], gen: torch.Generator, n_iter: int, stop_early: bool = True,
    tol: float = 1e-3, init: str = "random",
) -> tuple[torch.Tensor, int]:
    """Balanced spherical k-means on X [F, D] (fp32, finite), clusters of exactly `sizes`.

    Returns (perm [F] with experts as consecutive blocks of `sizes`, iterations run).
    `init`: "random" (E distinct neurons drawn with the seeded generator; as good as k-means++
    on clustered and unclustered features in our checks, and 2-3x faster on CPU) or "kmeans++".
    Stops once at most `tol` of the neurons change expert in an iteration (0: only when none do).
    `stop_early=False` runs all `n_iter` iterations even once nothing changes (for timing).
    """
    F = X.shape[0]
    E = len(sizes)
    X = torch.nn.functional.normalize(X, dim=1)  # [F, D]; all-zero rows stay zero
    if init == "kmeans++":
        seeds = _kmeans_pp_seeds(X, E, gen)
    elif init == "random":
        seeds = torch.randperm(F, generator=gen)[:E].to(X.device)
    else:
        raise LTEError(f"unknown k-means init {init!r}; choose 'random' or 'kmeans++'")
    centroids = X.index_select(0, seeds)  # [E, D]
    labels = None
    capacity = None
    iterations = 0
    for _ in range(max(n_iter, 1)):
        sim = X @ centroids.T  # [F, E] cosine similarities
        capacity = _capacities(sim, sizes)
        new_labels = _balanced_assign(sim, capacity)
        iterations += 1
        if stop_early and labels is not None:
            moved = int((new_labels != labels).sum())
            if moved <= tol * F:
                labels = new_labels
                break
        labels = new_labels
        centroids = torch.nn.functional.normalize(_cluster_sums(X, labels, E), dim=1)  # [E, D]
    # Order experts by cluster index with the short one (if any) last; members by old index.
    key = labels.clone()
    if sizes[-1] != sizes[0]:
        short = torch.nonzero(capacity == sizes[-1]).flatten()[0]
        key = torch.where(labels == short, torch.full_like(labels, E), labels)
    perm = torch.argsort(key * F + torch.arange(F, device=X.device))  # unique keys: deterministic
    return perm, iterations
