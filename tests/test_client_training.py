"""A device's round: DP-SGD, the ledger written before anything leaves, retirement, state."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.client.ledger import PrivacyLedger
from fedrec.client.store import ClientStore
from fedrec.client.training import LocalTrainConfig, local_round
from fedrec.common.model import ModelConfig, RecModel
from fedrec.common.privacy.accounting import Guarantee
from fedrec.common.run_model import global_parameters

NUM_ITEMS = 40
ITEM_IDS = [f"i{k}" for k in range(NUM_ITEMS)]
INDEX = {item: k for k, item in enumerate(ITEM_IDS)}


def template(id_embeddings: bool = True) -> RecModel:
    rng = np.random.default_rng(0)
    text = rng.normal(size=(NUM_ITEMS, 384)).astype(np.float32)
    config = ModelConfig(dim=8, text_dim=8, id_embeddings=id_embeddings)
    return RecModel(config, text, None, time_range=(0, 100))


global_params = global_parameters


CONFIG = LocalTrainConfig(
    steps=3,
    sample_rate=0.5,
    num_negatives=5,
    noise_multiplier=1.0,
    aggregate_noise_multiplier=2.0,
    min_survivors=4,
    budget_epsilon=50.0,
    seed=0,
)


def deliver(store: ClientStore, cohort: str, items: list[int], start: int):
    store.ingest([ITEM_IDS[i] for i in items], list(range(start, start + len(items))), cohort)


def test_a_round_trains_writes_the_ledger_and_reports(tmp_path):
    model = template()
    params = global_params(model)
    with ClientStore(tmp_path) as store, PrivacyLedger.open(tmp_path / "ledger.jsonl") as ledger:
        deliver(store, "w0", [1, 2, 3, 4, 5], 0)
        result = local_round(
            model,
            params,
            store,
            ledger,
            INDEX,
            round=1,
            new_cohorts=frozenset({"w0"}),
            config=CONFIG,
        )
        # under DP-SGD each interaction is its own example, charged once to its own cohort
        assert result.declined is None and result.num_examples == 5
        assert any(not np.array_equal(result.params[n], params[n]) for n in params)
        train = [e for e in ledger.entries if e["kind"] == "train"]
        assert len(train) == 1 and train[0]["cohorts"] == {"w0": 5}
        assert train[0]["mechanism"]["noise_multiplier"] == 1.0
        assert 0 < result.metrics["max_interaction_epsilon"] < CONFIG.budget_epsilon
        assert result.metrics["preq_count"] == 5


def test_retirement_and_decline_when_the_budget_is_spent(tmp_path):
    model = template()
    config = LocalTrainConfig(**{**CONFIG.__dict__, "budget_epsilon": 3.0})
    with ClientStore(tmp_path) as store, PrivacyLedger.open(tmp_path / "ledger.jsonl") as ledger:
        deliver(store, "w0", [1, 2, 3, 4], 0)
        rounds = []
        for r in range(1, 30):
            result = local_round(
                model,
                global_params(model),
                store,
                ledger,
                INDEX,
                round=r,
                new_cohorts=frozenset(),
                config=config,
            )
            rounds.append(result)
            if result.declined:
                break
        assert rounds[-1].declined and "retired" in rounds[-1].declined
        assert "w0" in ledger.retired_cohorts()
        # idle under the distributed calibration: it still sends its noise, charged to nobody
        idle = rounds[-1]
        assert idle.num_examples == 0 and idle.metrics["noise_only"] == 1.0
        base = global_params(model)
        moved = np.concatenate([(idle.params[n] - base[n]).ravel() for n in base])
        assert np.std(moved) == pytest.approx(config.update_noise_std(), rel=0.1)
        assert ledger.entries[-1]["kind"] == "retire"  # no train entry for the noise
        eps = ledger.epsilons(Guarantee.DISTRIBUTED, config.delta)
        assert eps["w0"] <= 3.0
        # a new cohort has its own fresh budget: the device keeps learning
        deliver(store, "w1", [7, 8], 100)
        result = local_round(
            model,
            global_params(model),
            store,
            ledger,
            INDEX,
            round=99,
            new_cohorts=frozenset({"w1"}),
            config=config,
        )
        assert result.declined is None
        trains = [e for e in ledger.entries if e["kind"] == "train"]
        assert trains[-1]["cohorts"] == {"w1": 2} and trains[-1]["round"] == 99
        # what another round would push past the budget is retired right away (never later
        # than the next plan would): the device has nothing left until something new arrives
        after = ledger.entries[ledger.entries.index(trains[-1]) + 1 :]
        assert [e["kind"] for e in after] == ["retire"] and after[0]["round"] == 99
        assert "w1" in ledger.retired_cohorts() and result.idle_metrics is not None
        assert result.metrics["retired_now"] == 1.0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("item_table.weight", np.full((NUM_ITEMS, 13), np.nan, np.float32), "non-finite"),
        ("ctx_id.weight", np.zeros((3, 8), np.float32), "shape"),
    ],
)
def test_bad_global_parameters_are_rejected_before_anything_runs(tmp_path, name, value, message):
    model = template()
    params = global_params(model) | {name: value}
    with ClientStore(tmp_path) as store, PrivacyLedger.open(tmp_path / "ledger.jsonl") as ledger:
        deliver(store, "w0", [1, 2], 0)
        with pytest.raises(ValueError, match=message):
            local_round(
                model,
                params,
                store,
                ledger,
                INDEX,
                round=1,
                new_cohorts=frozenset({"w0"}),
                config=CONFIG,
            )
        assert ledger.entries == ()


def test_a_crash_after_the_ledger_write_loses_the_reply_not_the_entry(tmp_path, monkeypatch):
    model = template()
    with ClientStore(tmp_path) as store, PrivacyLedger.open(tmp_path / "ledger.jsonl") as ledger:
        deliver(store, "w0", [1, 2, 3, 4], 0)

        def crash(state):
            raise OSError("disk full")

        monkeypatch.setattr(store, "save_local_state", crash)
        with pytest.raises(OSError):
            local_round(
                model,
                global_params(model),
                store,
                ledger,
                INDEX,
                round=1,
                new_cohorts=frozenset(),
                config=CONFIG,
            )
        head = ledger.head_hash
    with PrivacyLedger.open(tmp_path / "ledger.jsonl") as reopened:
        assert reopened.head_hash == head and reopened.entries[-1]["kind"] == "train"


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    arrivals=st.lists(st.lists(st.integers(0, NUM_ITEMS - 1), max_size=4), min_size=1, max_size=6),
    budget=st.floats(1.0, 6.0),
)
def test_lifelong_invariants(tmp_path_factory, arrivals, budget):
    """ε never decreases, never exceeds the budget, a retired cohort is never trained again,
    and a reopened ledger continues where it was."""
    folder = tmp_path_factory.mktemp("device")
    model = template()
    config = LocalTrainConfig(**{**CONFIG.__dict__, "budget_epsilon": budget})
    previous: dict[str, float] = {}
    clock = 0
    for r, items in enumerate(arrivals, start=1):
        with ClientStore(folder) as store, PrivacyLedger.open(folder / "ledger.jsonl") as ledger:
            deliver(store, f"w{r}", items, clock)
            clock += 10
            retired_before = ledger.retired_cohorts()
            local_round(
                model,
                global_params(model),
                store,
                ledger,
                INDEX,
                round=r,
                new_cohorts=frozenset({f"w{r}"}),
                config=config,
            )
            eps = ledger.epsilons(Guarantee.DISTRIBUTED, config.delta)
            for cohort, value in eps.items():
                assert value <= budget + 1e-9
                assert value >= previous.get(cohort, 0.0) - 1e-12
            previous = eps
            last = ledger.entries[-1] if ledger.entries else {"kind": None}
            if last["kind"] == "train":
                assert not set(last["cohorts"]) & retired_before


def _update_norm(model, first, second, config) -> float:
    import torch

    from fedrec.client.training import _train

    start = global_params(model)
    when = torch.full((len(second),), 50, dtype=torch.int64)
    new, _ = _train(model, first, second, when, config, torch.Generator().manual_seed(0))
    return float(np.sqrt(sum(np.sum((new[n] - start[n]) ** 2) for n in start)))


@pytest.mark.parametrize("id_embeddings", [True, False])  # ghost clipping / ExpandedWeights
def test_every_device_update_is_in_one_unit_and_bounded_by_lr_c(id_embeddings):
    """Without noise, a device's update is at most lr·C however many examples it holds (the
    user-level sensitivity), and a one-example device moves by at most lr·C/B (its example's
    contribution, in the same unit as everyone's)."""
    import torch

    model = template(id_embeddings)
    config = LocalTrainConfig(
        steps=2,
        sample_rate=1.0,
        num_negatives=5,
        lr=3.0,
        clip_norm=0.5,
        noise_multiplier=0.0,
        budget_guarantee=Guarantee.LOCAL,
        reference_batch=4,
        seed=0,
    )
    rng = np.random.default_rng(0)
    many = torch.tensor(rng.integers(0, NUM_ITEMS, size=(2, 200)))
    big = _update_norm(model, None, many[1], config)  # single interactions, as DP-SGD trains
    assert 0.9 * config.lr * config.clip_norm < big <= config.lr * config.clip_norm * (1 + 1e-5)
    one = _update_norm(model, None, many[1][:1], config)
    assert 0 < one <= config.lr * config.clip_norm / config.reference_batch * (1 + 1e-5)


@pytest.mark.parametrize("id_embeddings", [True, False])  # ghost clipping / ExpandedWeights
def test_empty_poisson_batches_are_steps_in_both_clipping_modes(id_embeddings):
    """At a tiny sampling rate every batch is empty: each is still a (zero-sum, noised)
    step, under ghost clipping and under per-sample gradients (ExpandedWeights) alike."""
    import torch

    model = template(id_embeddings)
    config = LocalTrainConfig(
        steps=3,
        sample_rate=1e-9,
        num_negatives=5,
        noise_multiplier=0.0,
        budget_guarantee=Guarantee.LOCAL,
        seed=0,
    )
    items = torch.tensor([2, 4])
    assert _update_norm(model, None, items, config) == 0.0
    noisy = LocalTrainConfig(**{**config.__dict__, "noise_multiplier": 1.0})
    assert _update_norm(model, None, items, noisy) > 0.0


MODEL_VARIANTS = {
    "content": {"id_embeddings": False},
    "ids": {},
    "text-bias": {"id_embeddings": False, "text_bias": True},
    "frozen": {"id_embeddings": False, "train_only": "item_table.weight,tgt_text.weight"},
    "user": {"id_embeddings": False, "user_embedding": True},
    # the same content model, every embedding norm by one route: the Gram form, or row sums
    "gram": {"id_embeddings": False},
    "dense": {"id_embeddings": False},
}


@pytest.mark.parametrize("form", ["single", "pair"])
@pytest.mark.parametrize("clipping", ["fused", "opacus"])
@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
@pytest.mark.parametrize("batch", [1, 5])
def test_private_step_equals_opacus_hooks_step(batch, variant, clipping, form, monkeypatch):
    """A device's DP step, with fedrec's fused per-example clipping or through Opacus's own
    machinery (noise added later), moves the parameters exactly as Opacus's hooks +
    DPOptimizer at noise 0 do: the same per-example gradients, clipped jointly, summed,
    divided by B. For every model variant (both routes of each kind of weight: ghost and
    materialized Linear norms, Gram and dense Embedding norms; frozen weights untouched), on
    single-interaction examples (what DP-SGD trains; the context tower frozen) and on pairs."""
    import copy

    import torch
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from fedrec.client.training import (
        _dp_step_machinery,
        _fused_private_step,
        _step,
        context_frozen,
    )
    from fedrec.common.examples import PairSoftmaxLoss, sample_negatives

    if variant in ("gram", "dense"):
        monkeypatch.setattr("fedrec.common.privacy.dpsgd.EMBEDDING_NORM_ROUTE", variant)
    rng = np.random.default_rng(0)
    text = rng.normal(size=(NUM_ITEMS, 384)).astype(np.float32)
    years = rng.integers(1995, 2000, size=NUM_ITEMS)  # few buckets: shared rows in a batch
    model_config = ModelConfig(dim=8, text_dim=8, **MODEL_VARIANTS[variant])
    model = RecModel(model_config, text, years, time_range=(0, 100))
    torch.manual_seed(0)
    for p in model.parameters():  # away from the zero init, so every table has gradients
        torch.nn.init.normal_(p, std=0.3)
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    config = LocalTrainConfig(
        lr=0.7, clip_norm=0.05, reference_batch=3, noise_multiplier=0.0, clipping=clipping
    )
    g = torch.Generator().manual_seed(0)
    first, second = (
        torch.randint(NUM_ITEMS, (batch,), generator=g),
        torch.randint(NUM_ITEMS, (batch,), generator=g),
    )
    single = form == "single"
    if single:
        first = None
    negatives, hits = sample_negatives(first, second, NUM_ITEMS, 7, g)
    inputs = (first, second, negatives, torch.full((batch,), 50, dtype=torch.int64))
    if model_config.user_embedding:
        inputs = (*inputs, torch.zeros_like(second))

    frozen = contextlib.ExitStack()  # as `_train` does for single-interaction examples
    frozen.enter_context(context_frozen(model, single))
    frozen.enter_context(context_frozen(reference, single))
    if clipping == "fused":
        sgd = torch.optim.SGD(model.parameters(), lr=config.lr)
        _fused_private_step(model, sgd, inputs, hits, config)
    else:
        module, optimizer, criterion = _dp_step_machinery(model, config)
        if hasattr(module, "enable_hooks"):
            module.enable_hooks()
        _step(module, optimizer, criterion, inputs, hits)
        optimizer.zero_grad(set_to_none=True)
        if hasattr(module, "disable_hooks"):
            module.disable_hooks()

    hooks = GradSampleModule(reference, batch_first=True, loss_reduction="mean")
    expected = DPOptimizer(
        torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=config.lr),
        noise_multiplier=0.0,
        max_grad_norm=config.clip_norm,
        expected_batch_size=config.reference_batch,
    )
    PairSoftmaxLoss()(hooks(*inputs), hits).backward()
    expected.step()
    for (name, got), (_, want) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    trained = [p for p in reference.parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in trained])
    assert float(norms.norm(dim=0).min()) > config.clip_norm  # every example was clipped
    changed = {
        name
        for (name, p), q in zip(model.named_parameters(), initial.parameters(), strict=True)
        if not torch.equal(p, q)
    }
    expected_changed = {n for n, p in model.named_parameters() if p.requires_grad}
    if single and not model.config.user_embedding:  # no context: q = 0, W_tgt·q has no gradient
        expected_changed -= {"tgt_text.weight"}
    assert changed == expected_changed
    hooks._close()
    frozen.close()


@pytest.mark.parametrize(
    "kind, shape, route",
    [
        ("embedding", (3, 4), "auto"),  # fewer rows than lookups: per-example gradients kept
        ("embedding", (3, 4), "dense"),
        ("embedding", (3, 4), "gram"),
        ("embedding", (50, 4), "auto"),  # more rows than lookups: row sums, then a gather
        ("embedding", (50, 4), "dense"),
        ("embedding", (50, 4), "gram"),
        ("linear", (2, 3), "auto"),  # few features, several uses: per-example gradients kept
        ("linear", (16, 16), "auto"),  # the ghost (Gram) form
    ],
)
def test_every_clipping_route_equals_explicit_per_example_gradients(
    kind, shape, route, monkeypatch
):
    """Each exact route of `clip_per_example` gives the per-example norms and the clipped,
    divided sum that explicit per-example gradients give, built here by brute force."""
    import torch

    from fedrec.common.privacy.dpsgd import GradientTaps, clip_per_example

    monkeypatch.setattr("fedrec.common.privacy.dpsgd.EMBEDDING_NORM_ROUTE", route)
    torch.manual_seed(0)
    batch, uses = 5, 6
    taps = GradientTaps()
    if kind == "embedding":
        layer = torch.nn.Embedding(*shape)
        inputs = torch.randint(shape[0], (batch, uses))
        out = taps.embedding(layer, inputs)
    else:
        layer = torch.nn.Linear(shape[1], shape[0], bias=False)
        inputs = torch.randn(batch, uses, shape[1])
        out = taps.linear(layer, inputs)
    weights = torch.randn(out.shape)
    loss_sum = (out.square() * weights).sum()  # example n's loss uses only its own lookups

    per_example = []
    for n in range(batch):
        value = layer(inputs[n])
        grad = torch.autograd.grad((value.square() * weights[n]).sum(), layer.weight)[0]
        per_example.append(grad)
    per_example = torch.stack(per_example)
    want_norms = per_example.flatten(1).norm(dim=1)
    clip = float(want_norms.median())  # some examples clipped, some not
    factor = (clip / (want_norms + 1e-6)).clamp(max=1.0) / 3.0
    want_grad = (factor.view(-1, 1, 1) * per_example).sum(dim=0)

    norms = clip_per_example(loss_sum, taps, clip, batch, divide_by=3.0)
    torch.testing.assert_close(norms, want_norms)
    torch.testing.assert_close(layer.weight.grad, want_grad)


def test_gradient_taps_refuse_what_they_cannot_clip_exactly():
    """A weight used twice in one forward (its per-example norm needs cross terms), a Linear
    bias, or a trainable parameter the forward did not route through the taps is an error,
    never a silently wrong or missing gradient."""
    import torch

    from fedrec.common.privacy.dpsgd import GradientTaps

    layer = torch.nn.Linear(3, 2, bias=False)
    taps = GradientTaps()
    x = torch.ones(4, 3)
    taps.linear(layer, x)
    with pytest.raises(ValueError, match="used twice"):
        taps.linear(layer, x)
    other = torch.nn.Sequential(layer, torch.nn.Linear(2, 2, bias=False))
    with pytest.raises(ValueError, match=r"not tapped: \['1.weight'\]"):
        taps.require_all(other)
    with pytest.raises(ValueError, match="bias"):
        GradientTaps().linear(torch.nn.Linear(3, 2), x)


def test_a_devices_noise_and_batches_are_secret_unless_the_run_opts_out():
    """The device's DP randomness never follows its seed (which a simulation derives from the
    run's): the same round twice adds different noise and samples different batches. Only
    `reproducible_noise` ties them to the seed."""
    import dataclasses

    import torch

    from fedrec.client.training import _train, idle_result

    model = template(id_embeddings=False)
    params = global_params(model)

    def noise_twice(config):
        return [idle_result(params, config, 1, "idle").params for _ in range(2)]

    def batches_twice(config):  # no noise: the update depends only on which pairs were drawn
        config = dataclasses.replace(config, noise_multiplier=0.0, steps=1)
        pairs = torch.arange(0, 80).remainder(NUM_ITEMS).view(2, 40)  # 2^-40: the same batch
        when = torch.full((40,), 50, dtype=torch.int64)
        return [
            _train(model, pairs[0], pairs[1], when, config, torch.Generator().manual_seed(0))[0]
            for _ in range(2)
        ]

    def same(a, b):
        return all(np.array_equal(a[k], b[k]) for k in a)

    assert CONFIG.seed is not None and CONFIG.private
    assert not same(*noise_twice(CONFIG))
    assert not same(*batches_twice(CONFIG))
    reproducible = dataclasses.replace(CONFIG, reproducible_noise=True)
    assert same(*noise_twice(reproducible)) and same(*batches_twice(reproducible))
    with pytest.raises(ValueError, match="needs a seed"):
        dataclasses.replace(CONFIG, reproducible_noise=True, seed=None)


# -- adjacency: what one interaction changes in a device's release -------------------------------
windows_strategy = st.lists(
    st.lists(st.integers(0, NUM_ITEMS - 1), min_size=1, max_size=4), min_size=1, max_size=4
)


def _device_stream(windows: list[list[int]]) -> list[tuple[str, int, int]]:
    """(cohort, item, timestamp) of every interaction, one cohort per window, distinct times."""
    rows, clock = [], 0
    for w, items in enumerate(windows):
        for item in items:
            rows.append((f"w{w}", item, clock))
            clock += 1
    return rows


def _dp_examples_of(folder, rows, retired=frozenset()):
    """The DP-SGD examples a device forms from `rows` delivered window by window (the real
    store and `_examples`), as (first, second, time) rows, and the cohorts they charge."""
    from fedrec.client.training import _examples

    with ClientStore(folder, durable=False) as store:
        for cohort in dict.fromkeys(c for c, _, _ in rows):
            mine = [(i, t) for c, i, t in rows if c == cohort]
            store.ingest([ITEM_IDS[i] for i, _ in mine], [t for _, t in mine], cohort)
        data = store.interactions()
    trainable = set(data.cohort.tolist()) - retired
    first, second, when, present = _examples(data, INDEX, trainable, True)
    firsts = [None] * len(second) if first is None else first.tolist()
    return list(zip(firsts, second.tolist(), when.tolist(), strict=True)), present


def test_a_schema_1_store_that_paired_at_ingest_stays_readable(tmp_path):
    """A store written before pairing stopped (its `pair` column filled) opens, keeps its
    rows, takes new ones, and every interaction is then its own DP-SGD example."""
    import sqlite3

    from fedrec.client.store import SCHEMA_VERSION
    from fedrec.client.training import _examples

    db = sqlite3.connect(tmp_path / "store.sqlite")
    db.executescript(
        "CREATE TABLE interactions (id INTEGER PRIMARY KEY, item TEXT NOT NULL, "
        "timestamp INTEGER NOT NULL, cohort TEXT NOT NULL, pair INTEGER);"
        "CREATE UNIQUE INDEX interactions_event ON interactions(item, timestamp);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO interactions VALUES (1, 'i1', 0, 'w0', 1), (2, 'i2', 1, 'w0', 1),"
        " (3, 'i3', 2, 'w0', NULL);"
        "PRAGMA user_version = 1;"
    )
    db.close()
    with ClientStore(tmp_path) as store:
        assert store.ingest(["i4", "i1"], [3, 0], "w1") == 1  # (i1, 0) is already stored
        data = store.interactions()
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert data.item.tolist() == ["i1", "i2", "i3", "i4"]
    first, second, _, present = _examples(data, INDEX, {"w0", "w1"}, True)
    assert first is None and second.tolist() == [1, 2, 3, 4]
    assert present == {"w0": 3, "w1": 1}


@settings(max_examples=40, deadline=None)
@given(windows=windows_strategy, retire=st.integers(0, 3))
def test_removing_one_interaction_changes_only_its_own_charged_example(windows, retire):
    """For every interaction x of a device's stream (random windows = cohorts, some retired):
    the DP-SGD examples formed with and without x differ in exactly x's own example, and the
    cohort counts the ledger charges differ by exactly one, on x's cohort; an interaction of a
    retired cohort forms no example at all."""
    import tempfile
    from collections import Counter

    rows = _device_stream(windows)
    retired = frozenset({f"w{retire}"})
    with tempfile.TemporaryDirectory() as tmp:
        full, charged = _dp_examples_of(f"{tmp}/full", rows, retired)
        for x, (cohort, item, when) in enumerate(rows):
            without, charged_without = _dp_examples_of(
                f"{tmp}/{x}", rows[:x] + rows[x + 1 :], retired
            )
            if cohort in retired:
                assert Counter(full) == Counter(without) and charged == charged_without
                continue
            assert Counter(full) - Counter(without) == Counter({(None, item, when): 1})
            assert not Counter(without) - Counter(full)
            assert Counter(charged) - Counter(charged_without) == Counter({cohort: 1})
            assert not Counter(charged_without) - Counter(charged)


@settings(max_examples=15, deadline=None)
@given(windows=windows_strategy)
def test_one_interaction_moves_the_released_step_sum_by_at_most_c(windows):
    """The real fused DP-SGD step (noise off) on the examples a device forms with and without
    x, each example keeping its own public negatives: the steps' clipped sums differ by at
    most C, the sensitivity the accountant assumes, for every x."""
    import copy
    import tempfile

    import torch

    from fedrec.client.training import _fused_private_step, context_frozen
    from fedrec.common.examples import sample_negatives

    model = _randomised_template()
    config = LocalTrainConfig(lr=1.0, clip_norm=0.05, reference_batch=1, noise_multiplier=0.0)

    def step_sum(examples) -> torch.Tensor:
        """The parameters' move, -lr·(clipped sum)/B, of one step on these examples."""
        trained = copy.deepcopy(model)
        start = torch.cat([p.detach().flatten().clone() for p in trained.parameters()])
        if not examples:
            return torch.zeros_like(start)
        firsts = [f for f, _, _ in examples]
        first = None if firsts[0] is None else torch.tensor(firsts)
        second = torch.tensor([s for _, s, _ in examples])
        time = torch.tensor([t for _, _, t in examples])
        # each example draws its own negatives, seeded by its own timestamp: with and without
        # x, every other example keeps the same public randomness
        draws = [
            sample_negatives(None, second[k : k + 1], NUM_ITEMS, 7, _seeded(int(time[k])))
            for k in range(len(examples))
        ]
        negatives = torch.cat([n for n, _ in draws])
        hits = torch.cat([h for _, h in draws])
        with context_frozen(trained, first is None):
            sgd = torch.optim.SGD(trained.parameters(), lr=config.lr)
            _fused_private_step(trained, sgd, (first, second, negatives, time), hits, config)
        return torch.cat([p.detach().flatten() for p in trained.parameters()]) - start

    rows = _device_stream(windows)
    with tempfile.TemporaryDirectory() as tmp:
        full = step_sum(_dp_examples_of(f"{tmp}/full", rows)[0])
        for x in range(len(rows)):
            without = step_sum(_dp_examples_of(f"{tmp}/{x}", rows[:x] + rows[x + 1 :])[0])
            gap = float((full - without).norm())
            assert 0 < gap <= config.lr * config.clip_norm / config.reference_batch * (1 + 1e-4)


def _seeded(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


@functools.cache
def _randomised_template() -> RecModel:
    """A template away from the zero init (every example's gradient is larger than C), built
    once: `step_sum` copies it."""
    import torch

    model = template()
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model
