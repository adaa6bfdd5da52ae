"""Data-driven router initialisation and threshold calibration (ours; the paper leaves both open).

- `fit_routers`: at the start of stage 1, regress each router on the model's own expert
  activations so training starts near the target sparsity with the heaviest experts on
  ("fit": every layer at the target; "fit-global": one threshold over all layers).
- `calibrate_routers`: the older blind-scale inits ("open", "scale").
- `calibrate_tau`: after stage 1 (or before stage 2), set the routing threshold so hard routing
  skips exactly the target fraction of FFN neurons on held-out examples.
- `hard_sparsity`: per-layer sparsity of hard routing over a list of batches.
- `topk_for_sparsity`: the per-layer expert counts of top-k routing that match per-layer sparsities.

Every function takes an `LTEModel` and batches of {input_ids, attention_mask, ...} on any device.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..errors import LTEError
from ..passes import pieces

logger = logging.getLogger(__name__)

__all__ = ["ROUTER_INITS", "TAU_SCOPES", "fit_routers", "calibrate_routers", "calibrate_tau", "hard_sparsity",
           "topk_for_sparsity"]

ROUTER_INITS = ("auto", "fit", "fit-global", "open", "scale", "none")


@torch.no_grad()
def _calibration_forward(lmodel, batch: dict[str, torch.Tensor], mode: str, hooks: list,
                         state: dict[str, Any] | None = None) -> None:
    """An eval-mode pass of `batch` in routing `mode`, in pieces of at most `CALIBRATION_TOKENS` tokens,
    each stopped after the last FFN; `state["keep"]` holds the piece's real-token mask [T] (None without
    an attention mask) while it runs. Removes `hooks` and restores the model after."""
    routing, was_training = lmodel.routing, lmodel.training
    lmodel.set_routing(mode)
    lmodel.eval()
    state = {} if state is None else state
    try:
        device = next(lmodel.parameters()).device  # the model may already be on the GPU
        for piece in pieces(batch):
            mask = piece.get("attention_mask")
            state["keep"] = None if mask is None else mask.reshape(-1).to(device).bool()
            lmodel.forward_layers(**{k: v.to(device) for k, v in piece.items() if k != "labels"})
    finally:
        for hook in hooks:
            hook.remove()
        lmodel.set_routing(routing)
        lmodel.train(was_training)


def _real_rows(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """[..., C] -> [T, C] in fp32, only the real tokens where `keep` [T] is given."""
    t = t.reshape(-1, t.shape[-1]).float()
    return t if keep is None or keep.numel() != t.shape[0] else t[keep.to(t.device)]


def _expert_log_mass(h: torch.Tensor, sizes: torch.Tensor, col_energy: torch.Tensor | None) -> torch.Tensor:
    """Per token and expert, [T, F] -> [T, E]: log of the expert's activation mass.

    col_energy None: log of the mean square of the expert's neurons (its RMS, squared).
    col_energy [F] (the squared norms of the down projection's columns): log of the expert's share of
    the FFN output energy, sum_j h_j^2 |W_j|^2 over its neurons divided by the sum over all experts
    (cross terms ignored), which is comparable across layers.
    """
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=h.device), sizes.to(h.device))  # [F]
    if col_energy is None:
        sq = torch.zeros(h.shape[0], len(sizes), device=h.device).index_add_(1, owner, h.square())
        return torch.log(sq / sizes.to(h.device).float() + 1e-12).double()
    energy = torch.zeros(h.shape[0], len(sizes), device=h.device).index_add_(
        1, owner, h.square() * col_energy.to(h.device))
    share = energy / energy.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.log(share + 1e-12).double()


def _weighted_quantile(values: list[torch.Tensor], weights: list[torch.Tensor], q: float) -> float:
    """The q-quantile of every entry of `values` where each column counts its `weights` entry times: the
    smallest v with (weight of the entries <= v) >= q x (all the weight), as a sorted cumulative sum would give.

    values[i] [..., E_i] (one layer's logits or log-masses, any device), weights[i] [E_i] (its experts' neuron
    counts). Found by bisection on v, counting with one comparison per layer and step, then the exact entry:
    no sort, no copy of the values and no per-entry weights (the tau calibration holds 30 layers x 32k tokens
    x 384 experts = 377M logits; sorting them with per-entry weights on the host took minutes per unit).
    """
    values = [v.reshape(-1, v.shape[-1]) for v in values]
    weights = [w.to(v.device, torch.float64) for v, w in zip(values, weights)]
    total = sum(float(w.sum()) * v.shape[0] for v, w in zip(values, weights))
    need = q * total

    def weight_upto(theta: float) -> float:  # one host read per step
        return float(torch.stack([((v <= theta).sum(0, dtype=torch.float64) * w).sum()
                                  for v, w in zip(values, weights)]).sum())

    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    if weight_upto(lo) >= need:
        return lo
    dtype = values[0].dtype  # thresholds in the values' own precision, so each comparison is exact
    for _ in range(200):  # weight_upto(lo) < need <= weight_upto(hi): halve until no value of `dtype` lies between
        mid = float(torch.tensor(lo + (hi - lo) / 2, dtype=dtype))
        if not lo < mid < hi:
            break
        if weight_upto(mid) >= need:
            hi = mid
        else:
            lo = mid
    inf = float("inf")  # the answer is an entry in (lo, hi]: the smallest there
    return min(float(torch.where((v > lo) & (v <= hi), v, inf).min()) for v in values)


@torch.no_grad()
def fit_routers(lmodel, batch: dict[str, torch.Tensor], sparsity: float, logit_scale: float = 3.0,
                ridge: float = 1e-3, threshold: str = "token") -> list[float]:
    """Router init fitted to the model's own activations (ours; the paper leaves the init open).

    For every FFN, on the calibration batch's real tokens in dense routing, each expert gets a
    log-mass m[t, e] (see `_expert_log_mass`) and a threshold q splits the experts worth keeping
    from the others:

    - threshold="token" ("fit"): m is the log-RMS of the expert's activations and q_t the
      `sparsity`-quantile of the token's own experts, so every layer starts at the target;
    - threshold="global" ("fit-global"): m is the expert's share of its FFN's output energy and q
      one quantile over every layer and token (weighted by neurons), so layers whose output is
      carried by few experts start sparser and the others denser, at the same overall sparsity.

    The router is the ridge regression from the FFN input x to the target logits

        z[t, e] = logit_scale * clamp((m[t, e] - q) / s, -1, 1)

    (s: the layer's spread of the centred log-masses, median |m - q| over each calibration piece), so
    stage 1 starts with scores already polarised (|logit| ~ logit_scale), near the wanted sparsity and
    with the experts that carry the most activation on. This avoids both failure modes of a blind init: scores all near tau
    (soft routing halves the FFN and L_sep's gradient swamps the task loss) and scores all on
    (L_sep's barrier at tau then keeps every expert on). The batch runs in pieces of at most
    `CALIBRATION_TOKENS` tokens. Returns the hard-cut sparsity per layer on the batch's first piece.
    """
    if threshold not in ("token", "global"):
        raise LTEError(f"fit_routers threshold must be 'token' or 'global', got {threshold!r}")
    if not 0.0 <= sparsity < 1.0:
        raise LTEError(f"the router-fit sparsity must lie in [0, 1), got {sparsity}")
    layers = lmodel.lte_layers()
    energy = [layer.down_weight().detach().float().square().sum(0) if threshold == "global" else None
              for layer in layers]  # [F] per layer: |column j of the down projection|^2
    state: dict[str, Any] = {}  # the current piece's real-token mask

    global_q = None
    if threshold == "global":  # pass 1: one quantile of the log-shares over all layers and tokens
        masses: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []

        def collect(i, sizes):
            def hook(mod, args):
                masses.append(_expert_log_mass(_real_rows(args[0], state["keep"]), sizes, energy[i]).float())  # [T, E]
                weights.append(sizes)
            return hook

        hooks = [layer.output.register_forward_pre_hook(collect(i, layer.input.expert_sizes))
                 for i, layer in enumerate(layers)]
        _calibration_forward(lmodel, batch, "dense", hooks, state)
        global_q = _weighted_quantile(masses, weights, sparsity)

    xs: dict[int, torch.Tensor] = {}
    acc: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab_x(i):
        def hook(mod, args):
            xs[i] = _real_rows(args[0], state["keep"])  # [T, D]
        return hook

    def fit_h(i, sizes):
        def hook(mod, args):
            logm = _expert_log_mass(_real_rows(args[0], state["keep"]), sizes, energy[i])  # [T, E]
            x = xs.pop(i).double()
            q = torch.quantile(logm, sparsity, dim=1, keepdim=True) if global_q is None else global_q  # [T, 1]
            centred = logm - q
            spread = centred.abs().median().clamp_min(1e-6)
            z = logit_scale * (centred / spread).clamp(-1.0, 1.0)  # [T, E]
            xtx, xtz = acc.get(i, (0.0, 0.0))
            acc[i] = (xtx + x.T @ x, xtz + x.T @ z)
        return hook

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.input.register_forward_pre_hook(grab_x(i)))
        hooks.append(layer.output.register_forward_pre_hook(fit_h(i, layer.input.expert_sizes)))
    _calibration_forward(lmodel, batch, "dense", hooks, state)
    for i, layer in enumerate(layers):
        xtx, xtz = acc[i]
        d = xtx.shape[0]
        reg = ridge * torch.trace(xtx) / d
        w = torch.linalg.solve(xtx + reg * torch.eye(d, dtype=xtx.dtype, device=xtx.device), xtz)  # [D, E]
        layer.router.weight.copy_(w.T.to(layer.router.weight.dtype))
    achieved = hard_sparsity(lmodel, [next(pieces(batch))])  # a check on the first piece only: it is only logged
    logger.info("router init 'fit' (%s threshold, target %.2f): calibration sparsity %.3f", threshold, sparsity,
                sum(achieved) / len(achieved))
    return achieved


@torch.no_grad()
def _hard_pass(lmodel, batches: list[dict[str, torch.Tensor]], collect_logits: bool = False):
    """One eval pass of hard routing over `batches`: per-layer sparsity over real tokens and, with
    `collect_logits`, per layer the router logits of those tokens, [T, E] in fp32 on the model's device,
    with its experts' neuron counts [E] (two lists, one entry per layer)."""
    layers = lmodel.lte_layers()
    logits: list[list[torch.Tensor]] = [[] for _ in layers]
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def grab(i):
        def hook(mod, args, output):
            s = mod.scores.reshape(-1, mod.scores.shape[-1])  # [T, E]
            m = current["mask"]
            if m is not None and m.numel() == s.shape[0]:
                s = s[m]
            logits[i].append(torch.logit(s.double(), eps=1e-12).float())  # |logit| <= 27.6: fp32 holds it
        return hook

    hooks = [layer.input.register_forward_hook(grab(i)) for i, layer in enumerate(layers)] if collect_logits else []
    routing, was_training, tracking = lmodel.routing, lmodel.training, lmodel.track_stats
    budget = _budget(lmodel)  # a budgeted stage 2 is measured as it trains and serves
    lmodel.set_routing("hard", budget=budget)
    lmodel.eval()
    lmodel.track_stats = True
    try:
        with lmodel.separate_lte_stats():  # a training step's statistics (stage 2's TauHold) stay as they were
            device = next(lmodel.parameters()).device
            for batch in batches:  # whole: a per-batch expert budget picks experts over the batch
                mask = batch.get("attention_mask")
                current["mask"] = None if mask is None else mask.reshape(-1).to(device).bool()
                lmodel.forward_layers(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
            per_layer = lmodel.lte_stats(accumulated=True)["per_layer"]
    finally:
        for hook in hooks:
            hook.remove()
        lmodel.set_routing(routing, budget=budget if routing == "hard" else 0.0)
        lmodel.train(was_training)
        lmodel.track_stats = tracking
    collected = ([torch.cat(x) for x in logits], [layer.input.expert_sizes for layer in layers]) if collect_logits \
        else None
    return per_layer, collected


def hard_sparsity(lmodel, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Per-layer FFN sparsity of hard routing (at the model's tau) over `batches`' real tokens."""
    return _hard_pass(lmodel, batches)[0]


def topk_for_sparsity(lmodel, per_layer: list[float]) -> list[int]:
    """Experts per token, one count per layer, that top-k routing keeps to skip `per_layer`'s share of each
    layer's experts: round((1 - s_l) x E_l), within [0, E_l]."""
    layers = lmodel.lte_layers()
    if len(per_layer) != len(layers):
        raise LTEError(f"one sparsity per LTE layer is needed ({len(layers)}), got {len(per_layer)}")
    counts = [layer.router.out_features for layer in layers]
    return [max(0, min(e, int(round((1.0 - s) * e)))) for e, s in zip(counts, per_layer)]


TAU_SCOPES = ("global", "layer")


@torch.no_grad()
def calibrate_tau(lmodel, batches: list[dict[str, torch.Tensor]], target: float, tol: float = 0.002,
                  max_rounds: int = 12, scope: str = "global") -> dict[str, Any]:
    """Set the routing threshold tau so that hard routing skips `target` of the FFN neurons on `batches`.

    scope "global" (default): one tau for every layer. A shift of tau is one global offset of every
    router's logits (score > tau <=> logit > logit(tau)), so the per-layer profile that training
    learned keeps its shape; only the overall level moves (ours; it makes `target_sparsity` exact
    however far the eta controller ended from it). Each round records every router logit in one
    hard-routing pass and proposes logit(tau) = the neuron-weighted `target`-quantile of all of them;
    rounds repeat because a layer's inputs depend on the masks of the layers before it
    (`_search_threshold` keeps them from oscillating).

    scope "layer": one tau per layer (`lte_config.layer_tau`), each layer skipping `target` of its own
    neurons, so no layer can end far sparser than the rest (one global tau left the first FFN of
    SmolLM2 at 99.99% on E2E at a 0.9 target). Each round sets every layer's threshold to the
    `target`-quantile of its own logits; layer l is exact once the layers before it stopped moving,
    so rounds repeat until every layer is within `tol`.

    Returns {"tau", "sparsity", "per_layer", "rounds", "scope"} of the best thresholds seen,
    "initial_sparsity" (at the thresholds the model came with) and, for scope "layer", "layer_tau".
    """
    if not 0.0 <= target < 1.0:
        raise LTEError(f"target sparsity must lie in [0, 1), got {target}")
    if scope not in TAU_SCOPES:
        raise LTEError(f"unknown tau scope {scope!r}; choose one of {', '.join(TAU_SCOPES)}")
    if scope == "layer":
        return _calibrate_layer_tau(lmodel, batches, target, tol, max_rounds)

    found: list[float] = []  # the sparsity at the tau the model came with

    def measure(theta: float | None) -> tuple[float, list[float], float]:
        if theta is not None:
            lmodel.set_routing(lmodel.routing, tau=_sigmoid(theta), budget=_budget(lmodel))
        per_layer, (logits, weights) = _hard_pass(lmodel, batches, collect_logits=True)
        found.append(sum(per_layer) / len(per_layer))
        return found[-1], per_layer, _weighted_quantile(logits, weights, target)

    tau0 = min(max(float(lmodel.lte_config.tau), 1e-6), 1 - 1e-6)
    _, achieved, per_layer, rounds = _search_threshold(measure, math.log(tau0 / (1 - tau0)), target, tol,
                                                           max_rounds)
    logger.info("calibrated tau = %.6g: hard-routing sparsity %.4f on %d held-out batches (target %.3f, %d rounds)",
                lmodel.lte_config.tau, achieved, len(batches), target, rounds)
    return {"tau": float(lmodel.lte_config.tau), "sparsity": achieved, "per_layer": per_layer, "rounds": rounds,
            "initial_sparsity": found[0], "scope": "global"}


def _calibrate_layer_tau(lmodel, batches: list[dict[str, torch.Tensor]], target: float, tol: float,
                         max_rounds: int) -> dict[str, Any]:
    """`calibrate_tau(scope="layer")`: each layer's threshold at the `target`-quantile of its own logits."""
    per_layer, (logits, weights) = _hard_pass(lmodel, batches, collect_logits=True)
    initial = sum(per_layer) / len(per_layer)

    def error(levels: list[float]) -> float:
        return max(abs(x - target) for x in levels)

    best = (error(per_layer), list(lmodel.lte_config.layer_tau or [lmodel.lte_config.tau] * len(per_layer)),
            per_layer)
    rounds = 0
    while best[0] > tol and rounds < max_rounds:
        rounds += 1
        theta = [min(max(_weighted_quantile([x], [w], target), -_LOGIT_LIMIT), _LOGIT_LIMIT)
                 for x, w in zip(logits, weights)]
        lmodel.set_routing(lmodel.routing, layer_tau=[_sigmoid(t) for t in theta], budget=_budget(lmodel))
        per_layer, (logits, weights) = _hard_pass(lmodel, batches, collect_logits=True)
        if error(per_layer) < best[0]:
            best = (error(per_layer), list(lmodel.lte_config.layer_tau), per_layer)
    if best[1] != lmodel.lte_config.layer_tau:
        lmodel.set_routing(lmodel.routing, layer_tau=best[1], budget=_budget(lmodel))  # the best thresholds seen
    achieved = sum(best[2]) / len(best[2])
    logger.info("calibrated per-layer tau (%.4g .. %.4g): hard-routing sparsity %.4f, layers %.3f .. %.3f on %d "
                "held-out batches (target %.3f, %d rounds)", min(best[1]), max(best[1]), achieved, min(best[2]),
                max(best[2]), len(batches), target, rounds)
    return {"tau": float(lmodel.lte_config.tau), "layer_tau": best[1], "sparsity": achieved, "per_layer": best[2],
            "rounds": rounds, "initial_sparsity": initial, "scope": "layer"}


def _budget(lmodel) -> float:
    """The per-batch expert budget the model's hard routing has now (0: none)."""
    layers = lmodel.lte_layers()
    return float(layers[0].input.budget) if layers and lmodel.routing == "hard" else 0.0


def _sigmoid(theta: float) -> float:
    return float(torch.sigmoid(torch.tensor(theta, dtype=torch.float64)))


_LOGIT_LIMIT = math.log((1 - 1e-6) / 1e-6)  # tau kept in [1e-6, 1 - 1e-6]


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


def _secant(a: tuple[float, float], b: tuple[float, float], target: float) -> float:
    """The theta where the line through two (theta, sparsity) points, in logit(sparsity), meets `target`."""
    return a[0] + (_logit(target) - _logit(a[1])) * (b[0] - a[0]) / (_logit(b[1]) - _logit(a[1]))


def _search_threshold(measure, theta0: float, target: float, tol: float,
                      max_rounds: int) -> tuple[float, float, list[float], int]:
    """Find the logit threshold theta whose hard-routing sparsity is `target` (within `tol`).

    `measure(theta)` sets the threshold (None: keep the current one, `theta0`) and returns (sparsity,
    per-layer sparsity, the quantile proposal for the next theta). Sparsity grows with theta. The
    proposal alone is a fixed-point step that can overshoot back and forth when the masks of early
    layers move the inputs of later ones (E2E at 0.9 ended up to 9 points off after 6 such rounds). So it
    is used only until the target is bracketed; from then on every step is the secant of
    logit(sparsity) between the bracket's ends (sparsity against a logit threshold is close to a
    logistic curve), kept inside the bracket's middle 80% so the bracket shrinks every round, and
    the bracket's middle when the last two points fell on one side (one end stuck). Returns
    (theta, sparsity, per-layer, rounds) of the best theta measured.
    """
    achieved, per_layer, proposal = measure(None)
    best = (abs(achieved - target), theta0, achieved, per_layer)
    lo: tuple[float, float] | None = None  # (theta, sparsity) below the target
    hi: tuple[float, float] | None = None  # above it
    last: tuple[float, float] | None = None  # the point measured before this one
    theta, rounds = theta0, 0
    while best[0] > tol and rounds < max_rounds:
        if achieved < target and (lo is None or theta > lo[0]):
            lo = (theta, achieved)
        if achieved > target and (hi is None or theta < hi[0]):
            hi = (theta, achieved)
        side = achieved > target
        if lo is not None and hi is not None:  # bracketed: the secant, inside the bracket's middle 80%,
            share = (_secant(lo, hi, target) - lo[0]) / (hi[0] - lo[0])  # or its middle when one end is stuck
            share = 0.5 if last is not None and side == (last[1] > target) else min(max(share, 0.1), 0.9)
            step = lo[0] + share * (hi[0] - lo[0])
        else:  # one side only: the secant through the last two points if it points the right way, else the proposal
            step = proposal
            if last is not None and (_logit(achieved) - _logit(last[1])) * (theta - last[0]) > 0:
                step = _secant(last, (theta, achieved), target)
        step = min(max(step, -_LOGIT_LIMIT), _LOGIT_LIMIT)
        if step == theta:  # nothing moves the threshold (the proposal is where we are): stop
            break
        rounds += 1
        last, theta = (theta, achieved), step
        achieved, per_layer, proposal = measure(theta)
        if abs(achieved - target) < best[0]:
            best = (abs(achieved - target), theta, achieved, per_layer)
    if best[1] != theta:
        measure(best[1])  # leave the model at the best threshold seen
    return best[1], best[2], best[3], rounds


@torch.no_grad()
def calibrate_routers(lmodel, batch: dict[str, torch.Tensor], mode: str = "open", open_logit: float = 3.0,
                      logit_std: float = 0.5) -> None:
    """Data-driven router initialisation at the start of stage 1 (ours; the paper leaves it open).

    Problem: with a plain random init the router logits of a pre-trained model are tiny
    (SmolLM2-135M: std 0.1-0.2, so most scores sit within 0.05 of tau = 0.5). Soft routing then
    halves every expert's output (task loss 3.3 -> 6.5 on SmolLM2), and the separability loss
    1/(G - tau)^2 is huge (~600), its gradient swamps the task gradient after clipping, and short
    stage-1 runs never recover.

    - "open": each router weight becomes `open_logit * mu / |mu|^2 + noise`, where `mu` is the mean
      FFN input over the batch's real tokens (measured with a forward pre-hook on the router's
      module) and the noise (the core's random init, rescaled) gives logits of std `logit_std`.
      Every expert starts almost fully on (sigmoid(3) = 0.95): soft routing is close to the dense
      function (SmolLM2: task loss 3.30 -> 3.44, L_sep ~10) and sparsity grows from ~0 as L_eff
      (and the eta controller) push scores down.
    - "scale": keep the random directions, rescale each router so its logits have std `logit_std`.
    - "none": keep the core's initialisation.
    """
    if mode not in ROUTER_INITS:
        raise LTEError(f"unknown router_init '{mode}'; choose one of {list(ROUTER_INITS)}")
    if mode in ("none", "auto", "fit", "fit-global"):
        return
    layers = lmodel.lte_layers()
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    state: dict[str, Any] = {}  # the current piece's real-token mask
    hooks = [layer.input.register_forward_pre_hook(
        lambda mod, args, i=i: captured[i].append(_real_rows(args[0].detach(), state["keep"])))
        for i, layer in enumerate(layers)]
    _calibration_forward(lmodel, batch, "soft", hooks, state)
    for i, layer in enumerate(layers):
        x = torch.cat(captured[i])  # [T, D] FFN inputs of the real tokens
        w = layer.router.weight  # [E, D]
        noise = w.float()
        spread = (x @ noise.T).std().clamp_min(1e-12)  # std of the current logits
        new = noise * (logit_std / spread)
        if mode == "open":
            mu = x.mean(0)
            new = new + open_logit * mu / mu.dot(mu).clamp_min(1e-12)
        w.copy_(new.to(w.dtype))
    logger.info("router init '%s' on %d layers (open logit %.1f, logit std %.2f)", mode, len(layers), open_logit,
                logit_std)
