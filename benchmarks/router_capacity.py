"""Can a router predict the oracle's experts, on its training text and off it? Linear against MLP routers.

A dense causal LM is converted to LTE experts (k-means grouping, no training). For a few layers the
FFN inputs x [T, D] and activations h [T, F] are recorded on three texts: the first `--train-blocks`
blocks of the training text, blocks of its held-out tail, and blocks of another text. The oracle
keeps, per token, the half of the experts with the largest output energy (sum over the expert's
neurons of h_j^2 |W_down[:, j]|^2). Routers of several sizes (a linear layer, as LTE's, and MLPs
with hidden width H) are trained on the training blocks to predict the oracle's experts (binary
cross-entropy, AdamW); each then keeps its own top half per token.

Reported per layer, text and router: the relative error of the FFN output with the kept experts,
mean over tokens of |y - y_kept| / |y|; the oracle's error is the floor any router can reach.

`--sketches` adds predictors that learn nothing from text: each scores the experts from a cheap copy
of the FFN's own weights, so what it knows cannot be specific to a domain.
- `gate-q<b>`: the gate projection rounded to b bits (groups of 64 input channels, symmetric, b = 1:
  signs times the group's mean magnitude); score = sum over the expert of act(x Wg~^T)^2 c_j, with
  c_j = |W_down[:, j]|^2 times the mean of the up projection's u_j^2 on the training blocks.
- `gateup-q<b>`: gate and up both rounded; score = sum of (act(g~) u~)^2 |W_down[:, j]|^2.
- `gate-r<r>`: the gate projection's best rank-r approximation (SVD), scored as `gate-q`.
- `gate-exact`: the exact gate, scored as `gate-q` (what the rounding costs).
`bytes` is what a predictor reads per token as a fraction of the dense FFN's bf16 weights.

    PYTHONPATH=src python benchmarks/router_capacity.py --model runs/demo/dense --train-text builtin \\
        --other-text ../shared/data/lm/wikitext2_raw_test.txt --out router_capacity.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

import lte
from lte.baselines.wrappers import activation_fn
from lte.data import load_text_lm
from lte.loading import load_tokenizer


def _batch(ds, lo: int, hi: int) -> dict[str, torch.Tensor]:
    ids = torch.stack([ds[i]["input_ids"] for i in range(lo, hi)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def record(lmodel, layer_ids: list[int], ds, blocks: int, batch: int = 16) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (x [T, D], h [T, F]) over the first `blocks` blocks of `ds` (dense routing)."""
    layers = lmodel.lte_layers()
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in layer_ids}
    hs: dict[int, list[torch.Tensor]] = {i: [] for i in layer_ids}
    hooks = []
    for i in layer_ids:
        hooks.append(layers[i].input.register_forward_pre_hook(
            lambda mod, args, i=i: xs[i].append(args[0].reshape(-1, args[0].shape[-1]).float())))
        hooks.append(layers[i].output.register_forward_pre_hook(
            lambda mod, args, i=i: hs[i].append(args[0].reshape(-1, args[0].shape[-1]).float())))
    try:
        with torch.no_grad():
            for lo in range(0, min(blocks, len(ds)), batch):
                lmodel(**_batch(ds, lo, min(lo + batch, blocks, len(ds))))
    finally:
        for hook in hooks:
            hook.remove()
    return {i: (torch.cat(xs[i]), torch.cat(hs[i])) for i in layer_ids}


def expert_energy(h: torch.Tensor, w_down: torch.Tensor, expert_size: int) -> torch.Tensor:
    """[T, F] -> [T, E]: sum over each expert's neurons of h_j^2 |W_down[:, j]|^2 (W_down [D, F])."""
    tokens, width = h.shape
    return (h.square() * w_down.square().sum(0)).reshape(tokens, width // expert_size, expert_size).sum(-1)


def top_half(scores: torch.Tensor) -> torch.Tensor:
    """Bool [T, E]: each row's largest half."""
    k = scores.shape[1] // 2
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)


def output_error(h: torch.Tensor, keep: torch.Tensor, w_down: torch.Tensor, expert_size: int) -> float:
    """Mean over tokens of |y - y_kept| / |y|, y = h W_down^T, y_kept with only the `keep` experts."""
    y = h @ w_down.t()
    kept = (h * keep.repeat_interleave(expert_size, dim=1).to(h.dtype)) @ w_down.t()
    return float(((y - kept).norm(dim=1) / y.norm(dim=1).clamp_min(1e-6)).mean())


def rounded(w: torch.Tensor, bits: int, group: int = 64) -> torch.Tensor:
    """What a `bits`-bit copy of w [F, D] holds: symmetric rounding per group of `group` input channels."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    if bits == 1:
        return (g.sign() * g.abs().mean(-1, keepdim=True)).reshape(rows, cols)
    top = 2 ** (bits - 1) - 1
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / top
    return ((g / scale).round().clamp(-top, top) * scale).reshape(rows, cols)


def low_rank(w: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


class Sketch:
    """A training-free expert scorer built from a cheap copy of one FFN's weights (see the module doc)."""

    def __init__(self, kind: str, layer, x_train: torch.Tensor, expert_size: int):
        act = activation_fn(layer.activation)
        gate, up = layer.gate_weight().detach().float(), layer.up_weight().detach().float()
        down_sq = layer.down_weight().detach().float().square().sum(0)  # [F]
        rows, cols = gate.shape
        self.kind, self.size, self.act = kind, expert_size, act
        if kind.startswith("gateup-q"):
            bits = int(kind.removeprefix("gateup-q"))
            self.gate, self.up, self.weight = rounded(gate, bits), rounded(up, bits), down_sq
            self.bytes = 2 * rows * cols * bits / 8 / (3 * rows * cols * 2)
            return
        if kind == "gate-exact":
            self.gate, self.bytes = gate, 1 / 3
        elif kind.startswith("gate-q"):
            bits = int(kind.removeprefix("gate-q"))
            self.gate, self.bytes = rounded(gate, bits), rows * cols * bits / 8 / (3 * rows * cols * 2)
        elif kind.startswith("gate-r"):
            rank = int(kind.removeprefix("gate-r"))
            self.gate, self.bytes = low_rank(gate, rank), rank * (rows + cols) / (3 * rows * cols)
        else:
            raise ValueError(f"unknown sketch {kind!r}")
        self.up = None
        self.weight = down_sq * (x_train @ up.t()).square().mean(0)  # c_j

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(x @ self.gate.t())
        if self.up is not None:
            h = h * (x @ self.up.t())
        energy = h.square() * self.weight
        return energy.reshape(x.shape[0], -1, self.size).sum(-1)


def make_router(kind: str, width: int, experts: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, experts)
    hidden = int(kind.removeprefix("mlp"))
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, experts))


def train_router(router: nn.Module, x: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(router.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (1024,), generator=gen)
        loss = nn.functional.binary_cross_entropy_with_logits(router(x[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a dense causal-LM folder or embedded name")
    parser.add_argument("--train-text", required=True, help="the routers' training text (its last 10%% held out)")
    parser.add_argument("--other-text", required=True, help="text of another domain")
    parser.add_argument("--expert-size", type=int, default=8)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 12, 24])
    parser.add_argument("--routers", nargs="*", default=["linear", "mlp128", "mlp512"])
    parser.add_argument("--sketches", nargs="*", default=[], help="training-free predictors, e.g. gate-q4 gateup-q4 gate-r64")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--train-blocks", type=int, default=200)
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    lmodel = lte.load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    train, held = load_text_lm(args.train_text, tokenizer, block_size=args.block_size, split_ratio=0.1)
    other = load_text_lm(args.other_text, tokenizer, block_size=args.block_size)
    lmodel = lte.get_lte_model(lmodel.eval(), lte.LTEConfig(expert_size=args.expert_size, grouping="kmeans",
                                                          seed=args.seed),
                               progress=False, calibration=_batch(train, 0, min(32, len(train))))
    texts = {"train": record(lmodel, args.layers, train, args.train_blocks),
             "held-out": record(lmodel, args.layers, held, args.eval_blocks),
             "other": record(lmodel, args.layers, other, args.eval_blocks)}
    rows = []
    for i in args.layers:
        w_down = lmodel.lte_layers()[i].down_weight().detach().float()  # [D, F]
        x, h = texts["train"][i]
        labels = top_half(expert_energy(h, w_down, args.expert_size)).float()
        mean, std = x.mean(0), x.std(0) + 1e-6
        for kind in args.routers:
            router = make_router(kind, x.shape[1], labels.shape[1])
            train_router(router, (x - mean) / std, labels, args.steps, args.seed)
            for name, per_layer in texts.items():
                xe, he = per_layer[i]
                with torch.no_grad():
                    keep = top_half(router((xe - mean) / std))
                oracle = top_half(expert_energy(he, w_down, args.expert_size))
                rows.append({"layer": i, "text": name, "router": kind,
                             "parameters": sum(p.numel() for p in router.parameters()),
                             "error": output_error(he, keep, w_down, args.expert_size),
                             "oracle_error": output_error(he, oracle, w_down, args.expert_size)})
                print(f"layer {i:2d} {name:8s} {kind:7s} error {rows[-1]['error']:.3f} "
                      f"(oracle {rows[-1]['oracle_error']:.3f})", flush=True)
        for kind in args.sketches:
            sketch = Sketch(kind, lmodel.lte_layers()[i], x, args.expert_size)
            for name, per_layer in texts.items():
                xe, he = per_layer[i]
                with torch.no_grad():
                    keep = top_half(sketch(xe))
                oracle = top_half(expert_energy(he, w_down, args.expert_size))
                rows.append({"layer": i, "text": name, "router": kind, "bytes": sketch.bytes,
                             "error": output_error(he, keep, w_down, args.expert_size),
                             "oracle_error": output_error(he, oracle, w_down, args.expert_size)})
                print(f"layer {i:2d} {name:8s} {kind:10s} error {rows[-1]['error']:.3f} "
                      f"(oracle {rows[-1]['oracle_error']:.3f}) bytes {sketch.bytes:.3f}", flush=True)
    result = {"args": vars(args), "seconds": time.time() - start, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
