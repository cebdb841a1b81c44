"""Synthetic streams with known ground truth: topic preferences, drift, popularity, new items.

The generative story (a topic model, i.e. latent factors on the simplex):
- item i has one topic z_i, a Zipf popularity weight (rank+1)^-popularity_exponent and an
  arrival time a_i (0 for the initial catalogue, uniform over the timeline for new items);
- user u has topic preferences theta_u (Dirichlet) before and theta'_u after the drift;
  theta_u(t) = (1 - w(t)) theta_u + w(t) theta'_u with w = 0 ("none"), a step at drift_time
  ("abrupt") or a linear ramp over drift_width centred on drift_time ("gradual");
- an event of u at time t draws a topic k from theta_u(t), then an item of topic k among those
  already arrived (a_i <= t), proportionally to popularity. So p(i | u, t) is the
  latent-factor score sum_k theta_uk(t) [z_i = k] pop_i, sampled in two vectorized steps.
A repeated (user, item) draw is redrawn up to 3 times, then dropped (the earliest kept): the
realized mean is a few percent below mean_interactions_per_user (19.7 of 20 at 100k x 20k,
18.7 at the 1000 x 500 default, where users exhaust their topics' popular items).
Item text is drawn from per-topic vocabularies, so a text encoder can recover an item's topic
from its title and genre alone: the cold-start signal for new items.

Everything is vectorized, so millions of events take seconds; the only Python loop is over the
item titles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedrec.common.data.schema import Catalogue, Dataset, Interactions

EPOCH = 1_609_459_200  # 2021-01-01 UTC: timestamps look like real Unix seconds
# Themed vocabularies, so that a pretrained sentence encoder sees related words for one topic.
TOPICS: tuple[tuple[str, str], ...] = (  # (name, its 10 words)
    ("Space", "galaxy planet orbit rocket astronaut comet nebula starship alien lunar"),
    ("Romance", "love kiss wedding heart romance date valentine bride passion letter"),
    ("Crime", "detective murder heist gangster police alibi robbery suspect mafia prison"),
    ("Comedy", "laugh prank clown joke silly blunder party mischief goofy sitcom"),
    ("War", "battle soldier army tank trench general siege platoon bomber frontline"),
    ("Music", "guitar concert melody band singer piano rhythm album jazz opera"),
    ("Sports", "football stadium coach champion marathon tennis goal league boxing olympic"),
    ("Nature", "forest ocean mountain river wildlife glacier desert jungle volcano meadow"),
    ("Horror", "ghost vampire haunted zombie curse nightmare demon graveyard witch scream"),
    ("Fantasy", "dragon wizard castle sword elf quest kingdom spell goblin prophecy"),
    ("Cooking", "recipe chef kitchen bakery spice dinner pastry grill feast soup"),
    ("Science", "lab experiment robot genome quantum physics inventor chemistry atom theory"),
)
_WORDS_PER_TOPIC = 10
_REDRAWS = 3  # rounds of redrawing repeated (user, item) events before dropping the rest
_SYLLABLES = ("ka", "lo", "mi", "ru", "te", "zu", "ne", "vo", "shi", "pa")  # topics past TOPICS


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 1000
    num_items: int = 500
    num_topics: int = 8  # up to len(TOPICS) get real words; more get made-up ones
    mean_interactions_per_user: float = 20.0  # before dropping repeats; at least 1 per user
    popularity_exponent: float = 1.0  # Zipf: weight (rank+1)^-s, 1.0 is the classic long tail
    drift: Literal["none", "abrupt", "gradual"] = "none"
    drift_time: float = 0.5  # fraction of the timeline where preferences switch (abrupt) / half-way
    drift_width: float = 0.5  # gradual only: fraction of the timeline the change is spread over
    new_item_fraction: float = 0.2  # items arriving during the timeline, not there at the start
    time_span_days: float = 60.0
    topic_concentration: float = 0.3  # Dirichlet alpha; < 1 gives users 1-3 dominant topics
    words_per_title: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.drift not in ("none", "abrupt", "gradual"):
            raise ValueError(f"drift must be none, abrupt or gradual, got {self.drift!r}")
        if min(self.num_users, self.num_items, self.num_topics) < 1:
            raise ValueError("num_users, num_items and num_topics must be >= 1")
        if not 1 <= self.words_per_title <= _WORDS_PER_TOPIC:
            raise ValueError(f"words_per_title must be in [1, {_WORDS_PER_TOPIC}]")
        if not (0.0 <= self.drift_time <= 1.0 and 0.0 < self.drift_width <= 1.0):
            raise ValueError("drift_time must be in [0, 1] and drift_width in (0, 1]")
        if not 0.0 <= self.new_item_fraction < 1.0:
            raise ValueError(f"new_item_fraction must be in [0, 1), got {self.new_item_fraction}")
        if self.num_items - _num_new(self) < self.num_topics:
            raise ValueError("every topic needs an item at the start: too few initial items")
        if self.mean_interactions_per_user < 1 or self.time_span_days <= 0:
            raise ValueError("mean_interactions_per_user must be >= 1, time_span_days > 0")
        if self.topic_concentration <= 0 or self.popularity_exponent < 0:
            raise ValueError("topic_concentration must be > 0, popularity_exponent >= 0")


@dataclass(frozen=True)
class SyntheticTruth:
    """What generated the data, for tests and for judging what a model recovered."""

    topic_names: tuple[str, ...]  # (K,)
    item_topic: np.ndarray  # (I,) int64
    item_popularity: np.ndarray  # (I,) float64 Zipf weights, sum 1
    item_arrival: np.ndarray  # (I,) int64 Unix seconds; == start for the initial catalogue
    user_topics_before: np.ndarray  # (U, K) float64 rows on the simplex
    user_topics_after: np.ndarray  # (U, K) equal to before when drift="none"
    start: int  # Unix seconds of the timeline's start
    end: int  # exclusive end
    drift_timestamp: int  # start + drift_time * span (the midpoint for gradual drift)


def generate_synthetic(cfg: SyntheticConfig) -> Dataset:
    """A synthetic `Dataset`; same config (seed included) gives identical output."""
    return generate_synthetic_with_truth(cfg)[0]


def generate_synthetic_with_truth(cfg: SyntheticConfig) -> tuple[Dataset, SyntheticTruth]:
    """The dataset (rows in stream order) and the ground truth that produced it."""
    rng = np.random.default_rng(cfg.seed)
    n_users, n_items, n_topics = cfg.num_users, cfg.num_items, cfg.num_topics
    span = max(1, round(cfg.time_span_days * 86_400))  # seconds

    # items: balanced topics, one initial "anchor" per topic so every topic is never empty
    item_topic = rng.permutation(np.arange(n_items) % n_topics).astype(np.int64)
    anchors = np.unique(item_topic, return_index=True)[1]
    candidates = np.setdiff1d(np.arange(n_items), anchors)
    arrival = np.zeros(n_items, dtype=np.int64)
    new = rng.choice(candidates, size=_num_new(cfg), replace=False)
    arrival[new] = rng.integers(0, span, size=len(new))
    popularity = (rng.permutation(n_items) + 1.0) ** -cfg.popularity_exponent
    popularity /= popularity.sum()

    # users: preferences before and after (drawn always, so drift modes share everything else)
    alpha = np.full(n_topics, cfg.topic_concentration)
    before = rng.dirichlet(alpha, size=n_users)  # (n_users, n_topics)
    after = rng.dirichlet(alpha, size=n_users)
    if cfg.drift == "none":
        after = before
    rate = rng.gamma(2.0, (cfg.mean_interactions_per_user - 1.0) / 2.0, size=n_users)
    counts = 1 + rng.poisson(rate)  # (n_users,) long-tailed activity
    user = np.repeat(np.arange(n_users, dtype=np.int64), counts)  # (N,)
    t = rng.integers(0, span, size=len(user))  # (N,) seconds since start

    # topic of each event: inverse CDF over the user's row of [before; after]
    use_after = rng.random(len(user)) < _drift_weight(cfg, t / span)
    row = user + n_users * use_after
    cdf = np.minimum(np.cumsum(np.concatenate([before, after]), axis=1), 1.0)
    cdf[:, -1] = 1.0  # rows end exactly where the next (offset by 1) begins: monotone overall
    cdf += np.arange(2 * n_users)[:, None]
    pos = np.searchsorted(cdf.ravel(), row + rng.random(len(user)), side="right")
    topic = np.clip(pos - row * n_topics, 0, n_topics - 1)

    # item of each event; repeats of a (user, item) are redrawn a few times, then dropped
    draw = _item_sampler(item_topic, arrival, popularity, span, rng)
    item = draw(topic, t)
    for _ in range(_REDRAWS):
        repeat = _repeats(user * n_items + item, t, span)
        if not repeat.any():
            break
        item[repeat] = draw(topic[repeat], t[repeat])
    keep = ~_repeats(user * n_items + item, t, span)
    user, item, t = user[keep], item[keep], t[keep]
    stream = _argsort_pair(t, user * n_items + item, n_users * n_items)  # (time, user, item)
    inter = Interactions(user[stream], item[stream], EPOCH + t[stream])

    names, vocab = _vocabulary(n_topics)
    pick = np.argsort(rng.random((n_items, _WORDS_PER_TOPIC)), axis=1)[:, : cfg.words_per_title]
    words = vocab[item_topic[:, None] * _WORDS_PER_TOPIC + pick]  # (n_items, words_per_title)
    titles = tuple(f"item {i}: {' '.join(w)}" for i, w in enumerate(words.tolist()))
    catalogue = Catalogue(np.arange(n_items).astype(str), titles, tuple(names[item_topic].tolist()))
    dataset = Dataset(_name(cfg), inter, catalogue, np.arange(n_users).astype(str))
    truth = SyntheticTruth(
        topic_names=tuple(names.tolist()),
        item_topic=item_topic,
        item_popularity=popularity,
        item_arrival=EPOCH + arrival,
        user_topics_before=before,
        user_topics_after=after,
        start=EPOCH,
        end=EPOCH + span,
        drift_timestamp=EPOCH + round(cfg.drift_time * span),
    )
    return dataset, truth


def _item_sampler(
    item_topic: np.ndarray,
    arrival: np.ndarray,
    popularity: np.ndarray,
    span: int,
    rng: np.random.Generator,
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """draw(topic, t): an item of that topic with arrival <= t, proportional to popularity."""
    order = np.lexsort((arrival, item_topic))  # items grouped by topic, oldest first
    topic_sorted = item_topic[order]
    key = topic_sorted * span + arrival[order]  # increasing: arrival < span
    cum = np.concatenate([[0.0], np.cumsum(popularity[order])])

    def draw(topic: np.ndarray, t: np.ndarray) -> np.ndarray:
        lo = np.searchsorted(topic_sorted, topic, side="left")
        hi = np.searchsorted(key, topic * span + t, side="right")  # > lo: anchors arrive at 0
        target = cum[lo] + rng.random(len(t)) * (cum[hi] - cum[lo])
        return order[np.clip(np.searchsorted(cum, target, side="right") - 1, lo, hi - 1)]

    return draw


def _repeats(pair: np.ndarray, t: np.ndarray, span: int) -> np.ndarray:
    """True for every event that is not the earliest of its (user, item) pair."""
    order = _argsort_pair(pair, t, span)
    sorted_pair = pair[order]
    out = np.zeros(len(pair), dtype=bool)
    out[order[1:]] = sorted_pair[1:] == sorted_pair[:-1]
    return out


def _argsort_pair(major: np.ndarray, minor: np.ndarray, minor_bound: int) -> np.ndarray:
    """Order by (major, minor) for non-negative ints, minor < minor_bound; one-key when it fits."""
    if len(major) == 0 or int(major.max()) < (2**62) // minor_bound:
        return np.argsort(major * minor_bound + minor, kind="stable")  # much faster than lexsort
    return np.lexsort((minor, major))


def _num_new(cfg: SyntheticConfig) -> int:
    return round(cfg.new_item_fraction * cfg.num_items)


def _drift_weight(cfg: SyntheticConfig, frac: np.ndarray) -> np.ndarray:
    """Probability that an event at timeline fraction `frac` follows the after-drift topics."""
    if cfg.drift == "none":
        return np.zeros_like(frac)
    if cfg.drift == "abrupt":
        return (frac >= cfg.drift_time).astype(np.float64)
    ramp_start = cfg.drift_time - cfg.drift_width / 2
    return np.clip((frac - ramp_start) / cfg.drift_width, 0.0, 1.0)


def _vocabulary(num_topics: int) -> tuple[np.ndarray, np.ndarray]:
    """(K,) topic names and (K * words per topic,) words, topic k's at [k*W, (k+1)*W)."""
    names, words = [], []
    for k in range(num_topics):
        if k < len(TOPICS):
            names.append(TOPICS[k][0])
            words.extend(TOPICS[k][1].split())
            continue
        names.append(f"Topic {k}")
        for w in range(_WORDS_PER_TOPIC):  # made-up words, unique by construction
            n, digits = k * _WORDS_PER_TOPIC + w, []
            while n or len(digits) < 3:
                n, d = divmod(n, len(_SYLLABLES))
                digits.append(_SYLLABLES[d])
            words.append("".join(digits))
    return np.array(names), np.array(words)


def _name(cfg: SyntheticConfig) -> str:
    return f"synthetic-u{cfg.num_users}-i{cfg.num_items}-{cfg.drift}-s{cfg.seed}"
