"""Hand-computed cases for the maths: both LTE losses, FFN and union sparsity, the active fraction, router init.

Each expected value is worked out in the comment next to it, so a wrong formula (a square turned
into an absolute value, a wrong last-expert size, a flipped quantile) fails here with numbers.
"""

from __future__ import annotations

import pytest
import torch

import lte
from lte.losses import efficiency_loss, lte_losses, separability_loss
from lte.stats import active_neurons, ffn_sparsity, union_sparsity
from tiny_models import VOCAB, build

# T = 3 tokens, E = 2 experts; token 1 is padding in the masked cases.
SCORES = torch.tensor([[0.1, 0.9], [0.5, 0.3], [0.7, 0.2]])
REAL = torch.tensor([True, False, True])


# ---------------------------------------------------------------------- losses
def test_efficiency_loss_is_the_mean_square_score_over_real_tokens():
    # all tokens: (0.01 + 0.81 + 0.25 + 0.09 + 0.49 + 0.04) / 6 = 1.69 / 6
    assert float(efficiency_loss(SCORES)) == pytest.approx(1.69 / 6)
    # real tokens 0 and 2: (0.01 + 0.81 + 0.49 + 0.04) / 4 = 1.35 / 4
    assert float(efficiency_loss(SCORES, REAL)) == pytest.approx(1.35 / 4)


def test_separability_loss_is_the_mean_inverse_square_distance_to_tau():
    # tau 0.5, eps 1e-3: (G - tau)^2 = 0.16, 0.16 | 0, 0.04 | 0.04, 0.09
    # 1 / (. + eps): 1/0.161, 1/0.161 | 1000, 1/0.041 | 1/0.041, 1/0.091
    terms = [1 / 0.161, 1 / 0.161, 1000.0, 1 / 0.041, 1 / 0.041, 1 / 0.091]
    assert float(separability_loss(SCORES, tau=0.5, eps=1e-3)) == pytest.approx(sum(terms) / 6)
    real = [terms[0], terms[1], terms[4], terms[5]]
    assert float(separability_loss(SCORES, REAL, tau=0.5, eps=1e-3)) == pytest.approx(sum(real) / 4)
    # another threshold: tau 0.3 -> (G - tau)^2 of token 0 = 0.04, 0.36
    one = torch.tensor([[0.1, 0.9]])
    assert float(separability_loss(one, tau=0.3, eps=1e-3)) == pytest.approx((1 / 0.041 + 1 / 0.361) / 2)


def test_lte_losses_average_layers_of_different_widths():
    second = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.5, 0.5, 0.0]])  # E = 3
    eff, sep = lte_losses([SCORES, second], REAL, tau=0.5, eps=1e-3)
    # layer 2, real tokens: squares 0, 1, 0.25, 0.25, 0.25, 0 -> 1.75 / 6
    assert float(eff) == pytest.approx((1.35 / 4 + 1.75 / 6) / 2)
    # layer 2, real tokens: (G - 0.5)^2 = 0.25, 0.25, 0, 0, 0, 0.25 -> 3/0.251 + 3/0.001 over 6
    sep2 = (3 / 0.251 + 3 / 0.001) / 6
    sep1 = (2 / 0.161 + 1 / 0.041 + 1 / 0.091) / 4
    assert float(sep) == pytest.approx((sep1 + sep2) / 2)


def test_losses_ignore_what_padding_holds():
    changed = SCORES.clone()
    changed[1] = torch.tensor([0.999, 0.001])  # only the padded token changes
    assert torch.equal(efficiency_loss(changed, REAL), efficiency_loss(SCORES, REAL))
    assert torch.equal(separability_loss(changed, REAL), separability_loss(SCORES, REAL))


# ---------------------------------------------------------------------- sparsity measures
# F = 5 neurons in experts of sizes [2, 2, 1] (the last one smaller); T = 4 tokens.
SIZES = torch.tensor([2, 2, 1])
MASK = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)


def test_active_neurons_and_ffn_sparsity_count_the_smaller_last_expert():
    assert active_neurons(MASK, SIZES).tolist() == [2.0, 2.0, 1.0, 2.0]
    # per token 1 - active / 5: 0.6, 0.6, 0.8, 0.6 -> mean 0.65
    assert ffn_sparsity(MASK, SIZES) == pytest.approx(0.65)
    # token 2 (the one with the small expert) is padding: 0.6
    assert ffn_sparsity(MASK, SIZES, torch.tensor([True, True, False, True])) == pytest.approx(0.6)


def test_union_sparsity_by_hand():
    assert union_sparsity(MASK, SIZES, 1) == pytest.approx(0.65)  # batch of 1: the per-token sparsity
    # groups (t0, t1): union [1, 1, 0] -> 4 of 5 on -> 0.2; (t2, t3): [1, 0, 1] -> 3 on -> 0.4
    assert union_sparsity(MASK, SIZES, 2) == pytest.approx(0.3)
    # 3: one group (t0, t1, t2), the partial (t3) dropped: every expert on
    assert union_sparsity(MASK, SIZES, 3) == pytest.approx(0.0)
    # larger than T: one group of all 4 tokens
    assert union_sparsity(MASK, SIZES, 8) == pytest.approx(0.0)
    # padding t2 out: real tokens t0, t1, t3; one group of 2 (t0, t1) -> 0.2
    assert union_sparsity(MASK, SIZES, 2, torch.tensor([True, True, False, True])) == pytest.approx(0.2)
    # only the small expert on, in every token: 1 - 1/5
    small = torch.tensor([[0, 0, 1]] * 4, dtype=torch.bool)
    assert union_sparsity(small, SIZES, 4) == pytest.approx(0.8)


def test_model_statistics_use_the_real_expert_sizes():
    """The LTE model's sparsity equals a count by hand with sizes [32, 32, 32, 4] (F = 100)."""
    lmodel = lte.get_lte_model(build("llama"), lte.LTEConfig(grouping="contiguous"), progress=False)
    with torch.no_grad():
        for layer in lmodel.lte_layers():
            layer.router.weight.mul_(4.0)  # spread the scores: some experts on, some off
    ids = torch.randint(2, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    lmodel.set_routing("hard").reset_lte_stats()
    with torch.no_grad():
        lmodel(input_ids=ids, attention_mask=mask)
    real = mask.reshape(-1).bool()
    sizes = torch.tensor([32.0, 32.0, 32.0, 4.0])
    by_hand = []
    for layer in lmodel.lte_layers():
        gate = layer.input.gate.reshape(-1, 4)[real] != 0  # [T real, E]
        assert gate[:, -1].any() and not gate.all(), "the test needs the small expert on somewhere, not all on"
        by_hand.append(1.0 - float((gate.float() @ sizes).mean()) / 100)
    assert lmodel.lte_stats()["per_layer"] == pytest.approx(by_hand)
    assert lmodel.lte_stats(accumulated=True)["per_layer"] == pytest.approx(by_hand)


def test_served_active_fraction_counts_the_smaller_last_expert():
    """`bench`'s union active fraction with a known mask: F = 200 = 6 experts of 32 + one of 8."""
    from lte.serving import bench, prepare_for_inference
    from lte.serving.prepare import sparse_modules
    from lte.serving.synthetic import pin_router_channel, random_llama

    hf = random_llama("tiny", seed=1)
    pin_router_channel(hf)  # channel 0 of every FFN input is > 0, so router row sign = expert on/off
    model = prepare_for_inference(lte.get_lte_model(hf, lte.LTEConfig(grouping="contiguous"), progress=False))
    for m in sparse_modules(model):
        assert m.num_experts == 7 and m.w_up.shape[0] == 200
        sign = torch.ones(7)
        sign[0] = -1.0  # expert 0 off, the small last expert on, for every token
        with torch.no_grad():
            m.w_router.zero_()
            m.w_router[:, 0] = sign
        m.tau = 0.5
    res = bench(model, batch_size=2, prompt_len=3, new_tokens=2, cache_len=8, runs=1)
    # on: 5 experts of 32 + the one of 8 = 168 of 200 neurons
    assert res["ffn_active_fraction"] == pytest.approx(168 / 200)


# ---------------------------------------------------------------------- router init
@pytest.mark.parametrize("target", [0.6, 0.25])
def test_fit_router_init_hits_the_target_with_the_heaviest_experts_on(target):
    """25 experts of 4 neurons: the fit starts each layer at the target, the experts with most mass on."""
    from lte.routing.fit import fit_routers

    lmodel = lte.get_lte_model(build("llama"), lte.LTEConfig(expert_size=4, grouping="contiguous"), progress=False)
    ids = torch.randint(2, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    h_in: dict[int, torch.Tensor] = {}
    hooks = [layer.output.register_forward_pre_hook(lambda mod, args, i=i: h_in.__setitem__(i, args[0].detach()))
             for i, layer in enumerate(lmodel.lte_layers())]
    with torch.no_grad():
        lmodel(**batch)  # dense: the activations h [T, F] the fit sees
    for hook in hooks:
        hook.remove()
    achieved = fit_routers(lmodel, batch, sparsity=target)
    assert achieved == pytest.approx([target] * len(achieved), abs=0.05)
    lmodel.set_routing("hard")
    with torch.no_grad():
        lmodel(**batch)
    for i, layer in enumerate(lmodel.lte_layers()):
        mass = h_in[i].reshape(-1, 25, 4).square().mean(-1).log()  # [T, E] log mean square per expert
        heavy = mass > torch.quantile(mass, target, dim=1, keepdim=True)  # the experts worth keeping
        on = layer.input.gate.reshape(-1, 25) != 0
        # a random mask of the same sparsity would agree on about t^2 + (1-t)^2 <= 0.63 of the entries
        assert (on == heavy).float().mean() > 0.75


def test_set_routing_tau_is_the_one_threshold():
    """A tau given to set_routing is the config's tau: routing, L_sep and later modes all use it."""
    lmodel = lte.get_lte_model(build("llama"), lte.LTEConfig(grouping="contiguous"), progress=False)
    inputs = {"input_ids": torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))}
    lmodel.set_routing("soft", tau=0.3)
    assert lmodel.lte_config.tau == 0.3 and all(layer.tau == 0.3 for layer in lmodel.lte_layers())
    with torch.no_grad():
        lmodel(**inputs)
    _, sep = lmodel.lte_loss()
    scores = [layer.input.loss_scores.reshape(-1, 4) for layer in lmodel.lte_layers()]
    by_hand = sum(float(separability_loss(s, tau=0.3)) for s in scores) / len(scores)
    assert float(sep) == pytest.approx(by_hand)
    lmodel.set_routing("hard")  # no tau given: the one set before
    assert all(layer.tau == 0.3 for layer in lmodel.lte_layers())
    with pytest.raises(lte.LTEError, match="tau"):
        lmodel.set_routing("hard", tau=1.5)


def test_train_args_embed_the_lte_config():
    from lte.training.args import TrainArgs, setting_fields

    hp = TrainArgs.from_dict({"eta": 0.7, "tau": 0.4, "batch-size": 3, "lte": {"grouping_iters": 5}})
    assert (hp.lte.eta, hp.lte.tau, hp.lte.grouping_iters, hp.batch_size) == (0.7, 0.4, 5, 3)
    assert TrainArgs.from_dict(hp.to_dict()) == hp
    assert not {"eta", "lam", "tau"} & {f for f in TrainArgs.__dataclass_fields__}  # one home: the LTEConfig
    rows = {name: (kind, default, text) for name, kind, default, text in setting_fields()}
    assert rows["tau"][:2] == (float, 0.5) and "threshold" in rows["tau"][2]
    assert rows["max_tokens"][0] is int and all(text for _, _, text in rows.values())
    with pytest.raises(lte.LTEError, match="tau"):
        TrainArgs.from_dict({"tau": 2.0})
