"""The model: parameter declaration, the privacy constraint's per-example structure, Opacus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedrec.common.data.history import UserHistories
from fedrec.common.data.schema import Interactions
from fedrec.common.examples import PairSoftmaxLoss, sample_negatives
from fedrec.common.model import ModelConfig, ModelScorer, RecModel, Scope, year_bucket

NUM_ITEMS = 30


def make_model(**overrides) -> RecModel:
    rng = np.random.default_rng(0)
    text = rng.normal(size=(NUM_ITEMS, 384)).astype(np.float32)
    years = rng.integers(1980, 2014, size=NUM_ITEMS)
    config = ModelConfig(dim=8, text_dim=16, **overrides)
    return RecModel(config, text, years, num_local_users=3, time_range=(0, 1000))


@pytest.mark.parametrize(
    "overrides", [{}, {"user_embedding": True}, {"time_knots": 1}, {"id_embeddings": False}]
)
def test_every_parameter_is_declared_exactly_once(overrides):
    model = make_model(**overrides)
    scopes = model.parameter_scopes()
    assert set(scopes) == {name for name, _ in model.named_parameters()}
    local = model.parameter_names(Scope.LOCAL)
    assert local == (["user.weight"] if overrides.get("user_embedding") else [])
    assert "user.weight" not in model.parameter_names(Scope.GLOBAL)


def test_train_only_freezes_the_other_global_parameters():
    model = make_model(text_bias=True, train_only="text_bias.weight, year_table.weight")
    assert sorted(model.parameter_names(Scope.GLOBAL)) == ["text_bias.weight", "year_table.weight"]
    frozen = model.parameter_names(Scope.FROZEN)
    assert "item_table.weight" in frozen and "ctx_text.weight" in frozen
    assert all(not model.get_parameter(n).requires_grad for n in frozen)
    with pytest.raises(ValueError, match="unknown parameters"):
        make_model(text_bias=True, train_only="no_such.weight")


def test_year_buckets():
    assert year_bucket(np.array([0, 1950, 1989, 1990, 2000, 2014, 2030])).tolist() == [
        0,
        1,
        1,
        2,
        12,
        26,
        26,
    ]


def _batch(b=4, negatives=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(NUM_ITEMS, (b,), generator=g)
    second = torch.randint(NUM_ITEMS, (b,), generator=g)
    when = torch.randint(0, 1000, (b,), generator=g)
    return first, second, when, *sample_negatives(first, second, NUM_ITEMS, negatives, g)


def test_each_examples_loss_depends_only_on_its_own_inputs():
    """No in-batch coupling: changing example 1 leaves example 0's loss and gradient unchanged."""
    model = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    first, second, when, negatives, hits = _batch()
    loss_fn = PairSoftmaxLoss(reduction="none")
    base = loss_fn(model(first, second, negatives, when), hits)
    grads = torch.autograd.grad(base[0], list(model.parameters()))
    first2, negatives2, when2 = first.clone(), negatives.clone(), when.clone()
    first2[1] = (first2[1] + 7) % NUM_ITEMS
    negatives2[1] = (negatives2[1] + 3) % NUM_ITEMS
    when2[1] = 999 - when2[1]
    changed = loss_fn(model(first2, second, negatives2, when2), hits)
    assert torch.equal(base[0], changed[0]) and not torch.equal(base[1], changed[1])
    grads2 = torch.autograd.grad(changed[0], list(model.parameters()))
    for a, b in zip(grads, grads2, strict=True):
        assert torch.equal(a, b)


SHARED_CASES = [
    {},
    {"user_embedding": True},
    {"text_bias": True, "bias_scale": 3.0},
    {"id_embeddings": False, "time_knots": 1},
]


def _logits_and_grads(model, forward, first, negatives, hits):
    _, second, when, *_ = _batch(b=6, negatives=5, seed=1)
    user = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = forward(first, second, negatives, when, user if model.config.user_embedding else None)
    loss = PairSoftmaxLoss()(logits, hits)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    pairs = zip(named, grads, strict=True)
    return logits, {n: torch.zeros_like(p) if g is None else g for (n, p), g in pairs}


@pytest.mark.parametrize("overrides", SHARED_CASES)
@pytest.mark.parametrize("pair", [True, False])
def test_forward_shared_equals_forward_on_the_same_negatives(overrides, pair):
    """The batched training path reproduces the per-example path's logits and gradients, with
    per-example negatives and with one (1, N) draw broadcast to every example."""
    model = make_model(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    first, second, _, negatives, _ = _batch(b=6, negatives=5, seed=1)
    first = first if pair else None
    shared = negatives[:1]
    for own in (negatives, shared):
        targets = second[:, None] if first is None else torch.stack([second, first], dim=1)
        hits = own[:, None, :].expand(6, -1, -1) == targets[:, :, None]
        expected, expected_grads = _logits_and_grads(
            model, model.forward, first, own.expand(6, -1), hits
        )
        got, got_grads = _logits_and_grads(model, model.forward_shared, first, own, hits)
        assert got.shape == expected.shape == (6, 1 if first is None else 2, 6)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5)
    # negative control: other negatives give other logits
    other = (negatives + 1) % NUM_ITEMS
    hits = torch.zeros(6, 1 if first is None else 2, 5, dtype=torch.bool)
    moved, _ = _logits_and_grads(model, model.forward_shared, first, other, hits)
    assert not torch.allclose(moved[..., 1:], expected[..., 1:])


def test_shared_negatives_are_one_draw_masked_per_example():
    g = torch.Generator().manual_seed(0)
    second = torch.tensor([0, 1, 2, 3])
    negatives, hits = sample_negatives(None, second, 4, 50, g, shared=True)
    assert negatives.shape == (1, 50) and hits.shape == (4, 1, 50)
    assert torch.equal(hits[:, 0, :], negatives == second[:, None])  # each row's own target


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = make_model()
    first, second, when, negatives, hits = _batch(b=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    loss_fn = PairSoftmaxLoss()
    losses = []
    for _ in range(20):
        loss = loss_fn(model(first, second, negatives, when), hits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_one_opacus_ghost_clipping_step_runs_and_changes_the_model():
    from opacus import PrivacyEngine

    from fedrec.common.privacy.dpsgd import register_gram_embedding

    register_gram_embedding()
    torch.manual_seed(0)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, second, when, _, _ = _batch(b=8)
    loader = DataLoader(TensorDataset(first, second, when), batch_size=4)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        criterion=PairSoftmaxLoss(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
        poisson_sampling=True,
    )
    g = torch.Generator().manual_seed(1)
    steps = 0
    for a, b, t in loader:
        negatives, hits = sample_negatives(a, b, NUM_ITEMS, 5, g)
        loss = criterion(private(a, b, negatives, t), hits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    assert steps == 2
    assert engine.get_epsilon(1e-5) > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "item_table.weight" in changed and "ctx_text.weight" in changed


def test_an_empty_poisson_batch_is_still_a_step():
    """Skipping an empty batch would under-count ε: it must be noised and accounted."""
    from opacus import PrivacyEngine

    from fedrec.common.privacy.dpsgd import step_on_empty_batch

    model = make_model()
    engine = PrivacyEngine(accountant="rdp")
    _, optimizer, _, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(*(torch.arange(4),) * 3), batch_size=2),
        criterion=PairSoftmaxLoss(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
        poisson_sampling=True,
    )
    before = model.item_table.weight.detach().clone()
    step_on_empty_batch(optimizer)
    step_on_empty_batch(optimizer)  # twice: the processed-gradient guard must be satisfied
    assert len(engine.accountant.history) == 1 and engine.accountant.history[0][2] == 2
    assert not torch.equal(before, model.item_table.weight)  # noise was added


def test_cold_item_is_represented_by_its_text():
    model = make_model()
    with torch.no_grad():
        model.ctx_text.weight.normal_()
        model.tgt_text.weight.normal_()
    vectors, _ = model.item_vectors()
    # id rows start at zero: an untrained item's vector is its text (+ year) projection
    assert torch.all(model.item_table.weight == 0)
    assert vectors.norm(dim=1).min() > 0
    model.text[0] = model.text[1]
    model.year[0] = model.year[1]
    vectors, _ = model.item_vectors()
    assert torch.allclose(vectors[0], vectors[1])


def test_scorer_uses_recency_weighted_history_and_bias_for_empty_history():
    model = make_model(time_knots=1, history_half_life=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    history = UserHistories.from_interactions(
        Interactions(user=np.array([0, 0]), item=np.array([3, 5]), timestamp=np.array([10, 20])),
        num_users=2,
    )
    scorer = ModelScorer(model, history)
    ctx = model.all_context_vectors().numpy()
    v, b = (x.numpy() for x in model.item_vectors())
    u = (0.5 * ctx[3] + 1.0 * ctx[5]) / 1.5  # the older item weighs 2^-1
    np.testing.assert_allclose(scorer(np.array([0]))[0], u @ v.T + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scorer(np.array([1]))[0], b, rtol=1e-6)


def test_time_varying_bias_serves_at_the_end_of_training():
    model = make_model()
    time_bias = model.item_columns["time_bias"]
    with torch.no_grad():
        model.item_table.weight[7, time_bias.stop - 1] = 5.0  # popular at the end of the span
        model.item_table.weight[8, time_bias.start] = 5.0  # item 8 was popular at the start
    weights = model.knot_weights(torch.tensor([0, 1000, 5000]))
    assert weights[0, 0] == 1 and weights[1, -1] == 1 and weights[2, -1] == 1
    _, bias = model.item_vectors()
    assert bias[7] - bias[8] == pytest.approx(5.0)


def test_gram_embedding_norms_equal_opacus_norms():
    from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample

    from fedrec.common.privacy.dpsgd import gram_embedding_norms

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Embedding(7, 3)
    index = torch.randint(7, (5, 9), generator=g)  # repeats inside examples
    backprops = torch.randn(5, 9, 3, generator=g)
    ours = gram_embedding_norms(layer, [index], backprops)[layer.weight]
    theirs = compute_embedding_norm_sample(layer, [index], backprops)[layer.weight]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_bias_scale_scales_item_biases_in_training_and_serving_alike():
    plain, scaled = make_model(), make_model(bias_scale=4.0)
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for model in (plain, scaled):
            model.item_table.weight[3, model.item_columns["bias"]] = 0.5
    _, b_plain = plain.item_vectors()
    _, b_scaled = scaled.item_vectors()
    assert (b_scaled[3] - b_scaled[4]) == pytest.approx(4 * (b_plain[3] - b_plain[4]))
    first, second = torch.tensor([1, 2]), torch.tensor([3, 5])
    negatives = torch.tensor([[4, 6], [4, 6]])
    time = torch.tensor([500, 500])
    with torch.no_grad():
        lp = plain(first, second, negatives, time)
        ls = scaled(first, second, negatives, time)
    # slot 0 of example 0 scores item 3 (the true one) against items 4 and 6
    gain = (ls[0, 0, 0] - ls[0, 0, 1]) - (lp[0, 0, 0] - lp[0, 0, 1])
    assert float(gain) == pytest.approx(1.5, abs=1e-5)
    with pytest.raises(ValueError, match="bias_scale"):
        ModelConfig(bias_scale=0.0)


def test_a_model_trained_on_single_interactions_trains_and_serves_its_biases_alone():
    """Under DP-SGD examples are single interactions (q = 0): the run trains only what they
    reach, and serving leaves out the history term the untrained context tower would add."""
    from fedrec.common.model_config import single_interaction_parameters

    trained = ",".join(single_interaction_parameters(ModelConfig()))
    model = make_model(time_knots=1, train_only=trained)
    full = make_model(time_knots=1)
    with torch.no_grad():
        for m in (model, full):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    _, second, when, negatives, hits = _batch()
    # the shortcut (biases only) gives the logits and gradients of the full computation
    short = model(None, second, negatives, when)
    long = full(None, second, negatives, when)
    torch.testing.assert_close(short, long)
    short.logsumexp(-1).sum().backward()
    long.logsumexp(-1).sum().backward()
    for name in ("item_table.weight", "year_table.weight"):
        torch.testing.assert_close(model.get_parameter(name).grad, full.get_parameter(name).grad)
    assert not full.tgt_text.weight.grad.any()  # q = 0: nothing for the projection to learn
    history = UserHistories.from_interactions(
        Interactions(user=np.array([0, 0]), item=np.array([3, 5]), timestamp=np.array([10, 20])),
        num_users=1,
    )
    _, bias = (x.numpy() for x in model.item_vectors())
    assert not model.learns_context and full.learns_context
    np.testing.assert_allclose(ModelScorer(model, history)(np.array([0]))[0], bias, rtol=1e-6)
    assert not np.allclose(ModelScorer(full, history)(np.array([0]))[0], bias, rtol=1e-3)


def test_dp_sgd_runs_train_the_single_interaction_parameters_unless_told_otherwise():
    from fedrec.common.run_config import SimulationConfig

    private = SimulationConfig()
    assert private.model.train_only == "item_table.weight,year_table.weight"
    assert SimulationConfig.from_flat({"dp": "off"}).model.train_only == ""
    assert SimulationConfig.from_flat({"dp": "user"}).model.train_only == ""
    chosen = SimulationConfig.from_flat({"model-train-only": "year_table.weight"})
    assert chosen.model.train_only == "year_table.weight"
    assert SimulationConfig.from_flat(private.to_flat()) == private
