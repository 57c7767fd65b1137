"""`ae` and `ae-embed`: budget arithmetic, exact stored counts, shared decoder with per-layer norms,
the decoded-weight cache, early stopping on a validator, the orientation-loss schedule, the
validator itself, and save → load round trips (tied embeddings included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import offcomp
from offcomp.checkpoint import load_compressed, save_compressed
from offcomp.errors import OffcompError
from offcomp.methods.ae import AELinear, ae_stored
from offcomp.methods.ae_embedding import AEEmbedConfig, alpha_at, orientation_loss
from offcomp.plan import Budget
from offcomp.registry import FitContext, FitUnit, get_method

from .conftest import linears, tiny_llama

FAST = {"epochs": 4, "validate_every": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def unit_for(shapes, budget: Budget, joint: bool = True, kind: str = "linear") -> FitUnit:
    return FitUnit("g", [f"m{i}" for i in range(len(shapes))], [tuple(s) for s in shapes], [kind] * len(shapes),
                   joint, budget)


def fit(method: str, weights, budget: Budget, joint: bool = True, ctx: FitContext | None = None, **options):
    meth = get_method(method)
    unit = unit_for([w.shape for w in weights], budget, joint)
    cfg = meth.parse_config(options, "g")
    hyper = meth.solve(unit, cfg)
    mods = linears(weights)
    return meth.fit(unit, cfg, hyper, mods, ctx or FitContext(seed=0)), mods, meth.stored_params(unit, cfg, hyper)


def unique_stored(layers) -> int:
    """Unique floating tensors of the built layers, minus each layer's own bias."""
    seen: dict[int, int] = {}
    for layer in layers:
        for name, p in layer.named_parameters():
            if name != "bias":
                seen[id(p)] = p.numel()
    return sum(seen.values())


def low_rank_rows(n: int, m: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g)) / r**0.5 * 0.05


# --- budgets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cr", [3.0, 10.0, 25.0])
@pytest.mark.parametrize("shapes", [[(576, 1536)] * 30, [(1536, 576)] * 30, [(576, 576)], [(1536, 576)]])
def test_budget_is_the_largest_fit_and_matches_svd(shapes, cr):
    ae, svd = get_method("ae"), get_method("svd")
    joint = len(shapes) > 1
    unit = unit_for(shapes, Budget("cr", cr), joint)
    target = unit.budget.target_params(unit.original_params)
    n, m = sum(s[0] for s in shapes), shapes[0][1]

    strict = ae.solve(unit, ae.Config(fill_budget=False))
    d = strict["latent"]
    assert strict["width"] == d  # the paper's coupling d = x
    assert ae_stored(n, m, d, d, "mlp") <= target < ae_stored(n, m, d + 1, d + 1, "mlp")

    hyper = ae.solve(unit, ae.Config())
    stored = ae.stored_params(unit, ae.Config(), hyper)
    dd, x = hyper["latent"], hyper["width"]
    assert dd >= d and x >= d
    # the leftover budget is spent: neither a wider decoder nor a larger latent still fits
    assert stored <= target < min(ae_stored(n, m, dd, x + 1, "mlp"), ae_stored(n, m, dd + 1, x, "mlp"))
    svd_stored = svd.stored_params(unit, svd.Config(), svd.solve(unit, svd.Config()))
    if joint:  # the paper's regime: n large, fine steps
        assert stored >= 0.99 * target
    if svd_stored >= 0.99 * target:  # where svd's own rank granularity allows it, both agree within 1 %
        assert abs(stored - svd_stored) <= 0.01 * svd_stored


def test_rank_sets_latent_and_width_couples():
    ae = get_method("ae")
    unit = unit_for([(256, 128)], Budget("rank", 12), joint=False)
    assert ae.solve(unit, ae.Config()) == {"latent": 12, "width": 12}
    assert ae.solve(unit, ae.Config(width=20)) == {"latent": 12, "width": 20}
    # with a fixed width, a cr budget solves d
    unit_cr = unit_for([(256, 128)], Budget("cr", 4), joint=False)
    h = ae.solve(unit_cr, ae.Config(width=8))
    assert h["width"] == 8
    assert ae_stored(256, 128, h["latent"], 8, "mlp") <= 256 * 128 // 4 < ae_stored(256, 128, h["latent"] + 1, 8, "mlp")


def test_errors_when_nothing_is_saved():
    ae, emb = get_method("ae"), get_method("ae-embed")
    with pytest.raises(OffcompError, match="saves nothing"):
        ae.solve(unit_for([(64, 32)], Budget("rank", 30), joint=False), ae.Config())
    with pytest.raises(OffcompError, match="latent size 1"):
        ae.solve(unit_for([(16, 512)], Budget("cr", 50), joint=False), ae.Config())
    with pytest.raises(OffcompError, match="saves nothing"):
        emb.solve(unit_for([(64, 32)], Budget("rank", 22), joint=False, kind="embedding"), emb.Config())
    with pytest.raises(OffcompError, match="width"):
        ae.parse_config({"arch": "linear", "width": 4}, "g")


@pytest.mark.parametrize("method,options", [("ae", {}), ("ae", {"arch": "linear"}), ("ae", {"width": 3}),
                                            ("ae-embed", {}), ("ae-embed", {"hidden": 9})])
@pytest.mark.parametrize("joint", [False, True])
def test_stored_count_equals_built_parameters(method, options, joint):
    meth = get_method(method)
    kind = "embedding" if method == "ae-embed" else "linear"
    shapes = [(40, 24), (56, 24), (40, 24)] if joint else [(72, 24)]
    unit = unit_for(shapes, Budget("cr", 2), joint, kind)
    cfg = meth.parse_config(options, "g")
    hyper = meth.solve(unit, cfg)
    originals = [nn.Embedding(n, m) if kind == "embedding" else nn.Linear(m, n) for n, m in shapes]
    layers = meth.build(unit, cfg, hyper, originals)
    assert meth.stored_params(unit, cfg, hyper) == unique_stored(layers)


# --- fitting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,options", [("ae", {"epochs": 20}), ("ae", {"arch": "linear", "epochs": 5})])
def test_error_falls_as_budget_grows(method, options):
    W = low_rank_rows(96, 48, 12)
    errors = []
    for cr in (8.0, 4.0, 2.0):
        (layer,), _, _ = fit(method, [W], Budget("cr", cr), joint=False, **options)
        errors.append(((layer.to_dense() - W).norm() / W.norm()).item())
    assert errors[0] > errors[1] > errors[2]


def test_fitted_scale_never_loses_to_enforced_norm():
    W = low_rank_rows(64, 32, 16)
    errs = {}
    for scale in ("norm", "fit"):
        (layer,), _, _ = fit("ae", [W], Budget("cr", 6), joint=False, scale=scale, epochs=3)
        errs[scale] = (layer.to_dense().detach() - W).norm().item()
    assert errs["fit"] < errs["norm"]  # same training, only the stored per-row scale differs


def test_ae_embed_improves_on_its_pca_start_and_error_falls():
    W = low_rank_rows(128, 32, 10, seed=3)
    emb = get_method("ae-embed")
    errors = []
    for rank in (2, 5, 9):
        unit = unit_for([W.shape], Budget("rank", rank), joint=False, kind="embedding")
        cfg = emb.parse_config({"epochs": 6}, "g")
        orig = nn.Embedding(*W.shape)
        orig.weight.data.copy_(W)
        (layer,) = emb.fit(unit, cfg, emb.solve(unit, cfg), [orig], FitContext(seed=0))
        errors.append(((layer.to_dense() - W).norm() / W.norm()).item())
    assert errors[0] > errors[1] > errors[2]


def test_joint_group_shares_decoder_and_keeps_each_layers_norms():
    Ws = [low_rank_rows(32, 24, 6, seed=s) * (s + 1) for s in range(3)]  # different scales per layer
    layers, mods, stored = fit("ae", Ws, Budget("cr", 2), joint=True, **FAST)
    assert all(lay.decoder is layers[0].decoder for lay in layers)
    assert stored == unique_stored(layers)
    for lay, w, mod in zip(layers, Ws, mods):
        torch.testing.assert_close(lay.norms.detach(), w.norm(dim=1))
        torch.testing.assert_close(lay.to_dense().norm(dim=1), w.norm(dim=1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lay.bias, mod.bias)
    assert not torch.equal(layers[0].norms, layers[2].norms)


def test_eval_mode_caches_the_decoded_weight_until_something_changes():
    (layer,), _, _ = fit("ae", [low_rank_rows(32, 16, 4)], Budget("cr", 2), joint=False, epochs=1)
    x = torch.randn(5, 16)
    train_out = layer.train()(x)
    layer.eval()
    with torch.no_grad():
        y1 = layer(x)
        w1 = layer._cache
        y2 = layer(x)
        assert layer._cache is w1  # decoded once
        torch.testing.assert_close(y1, train_out.detach())
        layer.latents.mul_(2.0)  # an in-place update invalidates the cache
        y3 = layer(x)
        assert layer._cache is not w1 and not torch.allclose(y3, y2)
    layer.train()
    assert layer._cache is None
    # with autograd needed (grad enabled, trainable params), eval mode decodes for the graph
    layer.eval()
    layer(x).sum().backward()
    assert layer.latents.grad is not None


def test_early_stopping_keeps_the_best_validated_epoch():
    W = low_rank_rows(48, 16, 4)
    scores = iter([5.0, 3.0, 4.0, 6.0, 7.0, 8.0])
    seen: list[torch.Tensor] = []

    def validate(cands: dict[str, nn.Module]) -> float:
        (mod,) = cands.values()
        assert isinstance(mod, AELinear)
        seen.append(mod.to_dense().detach().clone())
        return next(scores)

    ctx = FitContext(seed=0, validate=validate)
    (layer,), _, _ = fit("ae", [W], Budget("cr", 2), joint=False, ctx=ctx, epochs=6, validate_every=1)
    assert len(seen) == 6
    torch.testing.assert_close(layer.to_dense().detach(), seen[1])  # epoch 2 scored best
    assert not torch.allclose(seen[1], seen[-1])

    scores = iter([5.0, 3.0, 4.0, 6.0, 7.0, 8.0])
    seen.clear()
    fit("ae", [W], Budget("cr", 2), joint=False, ctx=ctx, epochs=6, validate_every=1, patience=2)
    assert len(seen) == 4  # best at check 2, then two checks without improvement


def test_row_weights_come_from_stats_and_missing_stats_are_an_error():
    W = low_rank_rows(32, 16, 4)
    with pytest.raises(OffcompError, match="row_weights"):
        fit("ae", [W], Budget("cr", 2), joint=False, row_weights="fisher_rows", epochs=1)
    w = torch.ones(32)
    w[:16] = 0.0  # only the second half counts
    ctx = FitContext(seed=0, stats={"m0": {"fisher_rows": w}})
    (layer,), _, _ = fit("ae", [W], Budget("cr", 2), joint=False, ctx=ctx, row_weights="fisher_rows", epochs=15)
    err = (layer.to_dense().detach() - W).norm(dim=1) / W.norm(dim=1)
    assert err[16:].mean() < err[:16].mean()


# --- orientation loss ------------------------------------------------------------------------------


def test_alpha_is_annealed_linearly_over_the_first_20_epochs():
    cfg = AEEmbedConfig()
    alphas = [alpha_at(e, cfg.alpha_start, cfg.alpha_end, cfg.anneal_epochs) for e in range(25)]
    assert alphas[0] == 1.0 and alphas[19] == pytest.approx(0.1) and alphas[24] == pytest.approx(0.1)
    steps = [a - b for a, b in zip(alphas[:19], alphas[1:20])]
    assert all(s == pytest.approx(0.9 / 19) for s in steps)
    pred, target = torch.randn(4, 6), torch.randn(4, 6)
    for epoch in (0, 10, 30):
        a = alpha_at(epoch, 1.0, 0.1, 20)
        cos = torch.nn.functional.cosine_similarity(pred, target, dim=1)
        want = 0.9975 / 5 * (1 - cos).mean() + 0.0025 * ((pred - target).abs() + 1e-10).pow(a).mean()
        torch.testing.assert_close(orientation_loss(cfg)(pred, target, None, epoch), want)


# --- end to end through the plan, the checkpoint and the validator ----------------------------------


def test_round_trip_joint_ae_and_tied_embedding_ae(tmp_path):
    model = tiny_llama(layers=3)
    emb_before = model.model.embed_tokens.weight.detach().clone()
    plan = offcomp.parse_plan({"groups": [
        {"modules": ["mlp.gate", "mlp.up"], "joint": True, "method": "ae", "cr": 3, "options": FAST},
        {"modules": ["attn.k"], "method": "ae", "ratio": 0.5, "options": {"arch": "linear", "epochs": 2}},
        {"modules": ["embed"], "method": "ae-embed", "cr": 4, "options": {"epochs": 3}},
    ]})
    report = offcomp.compress_(model, plan, seed=0)
    assert report.untied_embeddings
    torch.testing.assert_close(model.lm_head.weight, emb_before)  # the head keeps the original table
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    save_compressed(model, None, tmp_path / "ck", {"head": "causal-lm", "plan": plan.model_dump(),
                                                  "report": report.to_dict(), "base": {}})
    loaded = load_compressed(tmp_path / "ck").model
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)
    layers = loaded.model.layers
    assert layers[0].mlp.gate_proj.decoder is layers[2].mlp.up_proj.decoder
    assert layers[0].self_attn.k_proj.decoder is not layers[1].self_attn.k_proj.decoder
    assert not loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() != 0 and torch.equal(loaded.lm_head.weight, emb_before)


def test_validator_swaps_candidates_in_and_restores_the_model(bert_tokenizer):
    from offcomp.data import load_text
    from offcomp.validation import make_validator

    model = tiny_llama(vocab_size=len(bert_tokenizer))
    with pytest.raises(OffcompError, match="test split"):
        make_validator(model, bert_tokenizer, load_text("embedded", "test"), seq_len=64, max_tokens=256)
    validate = make_validator(model, bert_tokenizer, load_text("embedded", "validation"), seq_len=64,
                              max_tokens=256)
    name = "model.layers.0.mlp.down_proj"
    orig = model.get_submodule(name)
    base = validate({})
    zero = nn.Linear(orig.in_features, orig.out_features, bias=False)
    nn.init.normal_(zero.weight, std=1.0)  # a badly broken candidate
    worse = validate({name: zero})
    assert model.get_submodule(name) is orig
    assert validate({}) == pytest.approx(base)
    assert worse != pytest.approx(base)


def test_cache_built_under_inference_mode_serves_frozen_training():
    (layer,), _, _ = fit("ae", [low_rank_rows(32, 16, 4)], Budget("cr", 2), joint=False, epochs=1)
    layer.eval().requires_grad_(False)
    x = torch.randn(5, 16)
    with torch.inference_mode():
        layer(x)
    x.requires_grad_(True)
    layer(x).sum().backward()  # the cached weight is an ordinary tensor
    assert x.grad is not None


def test_pca_init_is_the_best_affine_rank_d_fit():
    from offcomp.methods.ae_train import pca_init

    X = low_rank_rows(80, 20, 20, seed=5) + 0.3
    enc, dec = nn.Linear(20, 6), nn.Linear(6, 20)
    pca_init(enc, dec, X)
    with torch.no_grad():
        err = (dec(enc(X)) - X).pow(2).sum().item()
    S = torch.linalg.svdvals((X - X.mean(0)).double())
    assert err == pytest.approx(S[6:].pow(2).sum().item(), rel=1e-4)
