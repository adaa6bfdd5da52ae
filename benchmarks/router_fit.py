"""How well does stage 1's router fit pick each token's experts on held-out examples of a generation task?

A diagnostic for recipe round 18 (issue 9): at 90% sparsity on E2E, LTE's recipe keeps 4-neuron experts chosen
by routers that `lte.routing.fit.fit_routers` fits (a ridge regression) on the first 32 training examples, while
Deja Vu's predictors see 8,192 tokens and pick single neurons. For each expert size and calibration set this
script converts the model (k-means grouping on the calibration batch, as stage 1 does; none for 1-neuron experts), fits the routers with the
library's own `fit_routers`, and records every FFN's input x [T, D] and activation h [T, F] on held-out examples
(teacher-forced prompt + reference, dense routing): the last `--eval-examples` of the training split, which no
calibration set contains. The task's own held-out MRs (`--holdout`, where recipe rounds score) are never read. Each router keeps its top k experts per token,
k = round((1 - sparsity) E), as top-k stage 2 serves them; the oracle keeps the k experts of largest output
energy (sum over the expert's neurons of h_j^2 |W_down[:, j]|^2), which no server can know.

Reported per expert size, calibration set and layer: the relative error of the FFN output with the kept experts,
mean over held-out tokens of |y - y_kept| / |y| (the oracle's error is the floor), and the recall of the oracle's
experts. `--bce-steps N` adds a router of the same shape trained on the same calibration tokens with Adam and
binary cross-entropy on the oracle's top-k labels (Deja Vu's predictor objective), from the ridge fit.

This is a routing diagnostic on the untrained model (no stage 1 or 2 steps): it says what the fit starts from,
not what the trained model scores.

`--task causal-lm` does the same on a language-modelling text (blocks of `--block-size` tokens; the last
`--holdout` share of the text, where recipe rounds score, is never read; the scored blocks are the training
part's last `--eval-examples`), and `--extra-text` scores the same routers again on other text, e.g. raw news
where the word-level WikiText-2 recipe rounds look for routers that carry off their training text.

    PYTHONPATH=src python benchmarks/router_fit.py --model smollm2-135m --data ../shared/data/e2e/valid.txt \\
        --expert-sizes 1 4 8 --calibration first:32 first:256 spread:256 --out router_fit.json
    PYTHONPATH=src python benchmarks/router_fit.py --task causal-lm --data ../shared/data/lm/wikitext2_tok_valid.txt \\
        --holdout 0.1 --sparsity 0.5 --expert-sizes 8 4 --calibration first:32 first:128 spread:128 --eval-examples 24 \\
        --extra-text ../shared/data/xsum/test.jsonl --extra-field document --extra-tokens 12288 --out router_fit_lm.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn
from torch.utils.data import Subset

import lte
from lte.data import load_text_lm
from lte.loading import load_tokenizer
from lte.routing.fit import fit_routers
from lte.study.tasks import setup_task
from lte.training.data import calibration_batch, make_collator


def task_settings(holdout: float, max_length: int, max_source_tokens: int) -> dict:
    return {"generation_format": "e2e", "prep": {"max_length": max_length, "holdout": holdout},
            "eval": {"max_source_tokens": max_source_tokens}}


def training_examples(args, tokenizer):
    """The task's training split (its held-out part, where recipe rounds score, never read)."""
    if args.task == "causal-lm":
        train, _ = load_text_lm(args.data, tokenizer, args.block_size, split_ratio=args.holdout)
        return train
    settings = task_settings(args.holdout, args.max_length, args.max_source_tokens)
    return setup_task("generation", args.model, args.data, tokenizer=tokenizer, settings=settings).train_data


def extra_batch(args, tokenizer) -> dict[str, torch.Tensor]:
    """`--extra-text` as blocks of `--block-size` tokens (its first `--extra-tokens`), collated."""
    blocks = load_text_lm(args.extra_text, tokenizer, args.block_size, max_tokens=args.extra_tokens,
                          text_field=args.extra_field)
    return make_collator(tokenizer)([blocks[i] for i in range(len(blocks))])


def held_out_batch(dataset, start: int, count: int, tokenizer) -> dict[str, torch.Tensor]:
    """Examples start .. start + count of `dataset`, collated."""
    return make_collator(tokenizer)([dataset[i] for i in range(start, min(start + count, len(dataset)))])


def record(lmodel, batch: dict[str, torch.Tensor], rows: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per FFN, (x [T, D], h [T, F]) over the batch's real tokens in dense routing, `rows` examples a pass."""
    layers = lmodel.lte_layers()
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    hs: list[list[torch.Tensor]] = [[] for _ in layers]
    state: dict[str, torch.Tensor] = {}

    def grab(store, i):
        def hook(mod, args):
            store[i].append(args[0].reshape(-1, args[0].shape[-1]).float()[state["keep"]])
        return hook

    hooks = [layer.input.register_forward_pre_hook(grab(xs, i)) for i, layer in enumerate(layers)]
    hooks += [layer.output.register_forward_pre_hook(grab(hs, i)) for i, layer in enumerate(layers)]
    lmodel.set_routing("dense")
    try:
        with torch.no_grad():
            for lo in range(0, batch["input_ids"].shape[0], rows):
                ids, mask = batch["input_ids"][lo:lo + rows], batch["attention_mask"][lo:lo + rows]
                state["keep"] = mask.reshape(-1).bool()
                lmodel(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    return [(torch.cat(x), torch.cat(h)) for x, h in zip(xs, hs)]


def expert_energy(h: torch.Tensor, down_sq: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """[T, F] -> [T, E]: sum over each expert's neurons of h_j^2 |W_down[:, j]|^2."""
    owner = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    return torch.zeros(h.shape[0], len(sizes)).index_add_(1, owner, h.square() * down_sq)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [T, E]: each row's k largest entries."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)


def output_error(h: torch.Tensor, keep: torch.Tensor, w_down: torch.Tensor, sizes: torch.Tensor) -> float:
    """Mean over tokens of |y - y_kept| / |y|, y = h W_down^T, y_kept with only the `keep` experts."""
    y = h @ w_down.t()
    kept = (h * keep.repeat_interleave(sizes, dim=1).float()) @ w_down.t()
    return float(((y - kept).norm(dim=1) / y.norm(dim=1).clamp_min(1e-6)).mean())


def recall(keep: torch.Tensor, oracle: torch.Tensor) -> float:
    return float((keep & oracle).sum() / oracle.sum())


def train_bce(router: nn.Linear, x: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> nn.Linear:
    """A copy of `router` trained with Adam on binary cross-entropy against `labels` (full batch up to 4,096 rows)."""
    trained = nn.Linear(router.in_features, router.out_features, bias=router.bias is not None)
    trained.load_state_dict(router.state_dict())
    trained.float()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(trained.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(4096, x.shape[0]),), generator=gen)
        loss = nn.functional.binary_cross_entropy_with_logits(trained(x[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return trained


def score_layers(lmodel, data, routers: dict[str, list], sparsity: float, tags: dict) -> list[dict]:
    """Per layer, the oracle's and each router's FFN output error and recall of the oracle's experts on the
    recorded (x, h), every router keeping its top k = round((1 - sparsity) E) experts per token."""
    rows = []
    for i, (layer, (x, h)) in enumerate(zip(lmodel.lte_layers(), data)):
        sizes = layer.input.expert_sizes.cpu()
        k = max(1, round((1 - sparsity) * len(sizes)))
        w_down = layer.down_weight().detach().float()
        oracle = top_k(expert_energy(h, w_down.square().sum(0), sizes), k)
        row = {**tags, "layer": i, "experts": len(sizes), "k": k, "oracle_error": output_error(h, oracle, w_down, sizes)}
        for name, per_layer in routers.items():
            with torch.no_grad():
                keep = top_k(per_layer[i](x.to(per_layer[i].weight.dtype)).float(), k)
            row[f"{name}_error"] = output_error(h, keep, w_down, sizes)
            row[f"{name}_recall"] = recall(keep, oracle)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a dense causal-LM folder or embedded name")
    parser.add_argument("--task", choices=("e2e", "causal-lm"), default="e2e")
    parser.add_argument("--data", required=True, help="E2E NLG text, or the causal-LM text (the study's data file)")
    parser.add_argument("--holdout", type=float, default=0.3,
                        help="share held out, never read (E2E MRs: the recipe study's 0.3; causal-lm: its prep.holdout)")
    parser.add_argument("--block-size", type=int, default=512, help="causal-lm: tokens per example")
    parser.add_argument("--extra-text", default=None, help="also score on this text (.txt / .json / .jsonl)")
    parser.add_argument("--extra-field", default="text", help="the JSON field of --extra-text")
    parser.add_argument("--extra-tokens", type=int, default=12288, help="the first tokens of --extra-text scored")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-source-tokens", type=int, default=96)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--expert-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--calibration", nargs="+", default=["first:32", "first:256"],
                        help="calibration sets as SAMPLE:COUNT, SAMPLE 'first' or 'spread' (stage 1's options)")
    parser.add_argument("--eval-examples", type=int, default=256,
                        help="the training split's last examples, scored (left out of every calibration set)")
    parser.add_argument("--bce-steps", type=int, default=0, help="also a router trained this many Adam steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    tokenizer = load_tokenizer(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train = training_examples(args, tokenizer)
    if not 0 < args.eval_examples < len(train) // 2:
        raise SystemExit(f"--eval-examples must lie between 1 and half the {len(train)} training examples")
    cut = len(train) - args.eval_examples  # scored: the training split's last examples, never the task's held-out part
    scored = {"held": held_out_batch(train, cut, args.eval_examples, tokenizer)}
    if args.extra_text:
        scored["extra"] = extra_batch(args, tokenizer)
    train = Subset(train, range(cut))
    rows = []
    for size in args.expert_sizes:
        for spec in args.calibration:
            sample, _, count = spec.partition(":")
            if sample not in ("first", "spread") or not count.isdigit() or int(count) < 1:
                raise SystemExit(f"--calibration {spec!r}: write SAMPLE:COUNT, e.g. first:32 or spread:256")
            calib = calibration_batch(train, tokenizer, int(count), sample)
            tokens = int(calib["attention_mask"].sum())
            lmodel = lte.get_lte_model(lte.load_model(args.model).float().eval(),
                                       lte.LTEConfig(expert_size=size, seed=args.seed,
                                                     grouping="contiguous" if size == 1 else "kmeans"),
                                       progress=False, calibration=calib)
            fit_routers(lmodel, calib, args.sparsity)
            routers = {"ridge": [layer.router for layer in lmodel.lte_layers()]}
            if args.bce_steps:
                seen = record(lmodel, calib)
                routers["ridge+bce"] = []
                for layer, (x, h) in zip(lmodel.lte_layers(), seen):
                    sizes = layer.input.expert_sizes.cpu()
                    k = max(1, round((1 - args.sparsity) * len(sizes)))
                    down_sq = layer.down_weight().detach().float().square().sum(0)
                    labels = top_k(expert_energy(h, down_sq, sizes), k).float()
                    routers["ridge+bce"].append(train_bce(layer.router, x, labels, args.bce_steps, args.seed))
                del seen
            for where, batch in scored.items():
                data = record(lmodel, batch)
                rows += score_layers(lmodel, data, routers, args.sparsity,
                                     {"expert_size": size, "calibration": spec, "calibration_tokens": tokens,
                                      "eval": where})
                mean = {key: sum(r[key] for r in rows[-len(data):]) / len(data)
                        for key in rows[-1] if key.endswith(("_error", "_recall"))}
                print(f"S={size} {spec:>10s} ({tokens} tokens) on {where}: "
                      + "  ".join(f"{k} {v:.3f}" for k, v in mean.items()), flush=True)
                del data  # the recorded activations take gigabytes: free them before the next batch or model
            del lmodel, routers
            if args.out:  # after every model, so a stopped run keeps what it measured
                result = {"args": vars(args), "held_out_tokens": int(scored["held"]["attention_mask"].sum()),
                          "scored_tokens": {k: int(b["attention_mask"].sum()) for k, b in scored.items()},
                          "seconds": time.time() - start, "torch": torch.__version__,
                          "machine": platform.processor() or platform.machine(), "rows": rows}
                with open(args.out, "w") as fh:
                    json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
