"""The recommendation model: a two-tower next-item model over public item features.

Shape of the privacy argument (why the model looks like this). Clients train with per-interaction
DP-SGD, whose guarantee needs each training example's gradient to depend on one privacy unit
plus parameters and public data. So in TRAINING the model has no per-user representation
computed from the raw history. Under DP-SGD an example is ONE interaction, its target item
scored with no context item (the global part of the score: item biases at the interaction's
time); without DP it may be a (context item -> target item) pair (see `fedrec.common.examples`).
Either way it is scored against negatives sampled from the public catalogue. At INFERENCE on the
device the user vector is a recency-weighted mean of the context vectors of the user's whole
private history: recommendations never leave the device.

Item tower (target side):  v_i = E_tgt[i] + W_tgt^T t_i + Y_tgt[year(i)]
Item bias:                 b_i(t) = s (B[i] + [w . t_i] + sum_k h_k(t) B_T[i, k]) + B_Y[year(i)]
Context tower:             q_c = E_ctx[c] + W_ctx t_c + Y_ctx[year(c)]
Score:                     s(c, i) = q_c . v_i + b_i
where t_i is the frozen text embedding of item i's title and genres (public). E_* start at zero,
so a brand-new item is represented by its text and release year alone (cold start). h_k are
piecewise-linear "hat" functions over K knots spanning the training time: each example's own
timestamp selects the bias it trains, and the model serves at the end of its training time, so
the bias follows what is popular now (recency is the strongest signal in the built-in data).

Every trainable module is an `nn.Embedding` or `nn.Linear` applied to batch-first inputs, which
is what Opacus needs for exact per-sample gradient norms (ghost clipping). The target-side text
projection is applied to the context vector instead of to every candidate's text
(q . W^T t = (W q) . t), so Opacus sees a (B, S, d) input rather than (B, S, C, 384).
"""

from __future__ import annotations

import enum

import numpy as np
import torch
from torch import nn

from fedrec.common.data.history import UserHistories
from fedrec.common.model_config import ModelConfig
from fedrec.common.privacy.dpsgd import GradientTaps, GramEmbedding


class Scope(enum.Enum):
    """Where a parameter lives. GLOBAL parameters are federated; LOCAL ones never leave a device."""

    GLOBAL = "global"
    LOCAL = "local"
    # Public and fixed: kept at the (seeded, identical everywhere) initial value, never
    # trained, sent or noised (`ModelConfig.train_only`).
    FROZEN = "frozen"


YEAR_MIN, YEAR_MAX = 1990, 2014  # one bucket per year inside, one for older, one for unknown


def year_bucket(years: np.ndarray) -> np.ndarray:
    """0 = unknown, 1 = before YEAR_MIN, then one bucket per year, last = YEAR_MAX and later."""
    years = np.asarray(years)
    clipped = np.clip(years, YEAR_MIN - 1, YEAR_MAX) - (YEAR_MIN - 1) + 1
    return np.where(years <= 0, 0, clipped).astype(np.int64)


NUM_YEAR_BUCKETS = YEAR_MAX - YEAR_MIN + 3


def reduce_text_features(features: np.ndarray, dim: int) -> np.ndarray:
    """PCA of the (public) catalogue's text embeddings down to `dim`, each component scaled to
    variance 1/dim (so a row has norm ~1).

    Fitted on the catalogue only, never on interactions, so it is public post-processing.
    Done with torch on the (384, 384) covariance: numpy's threaded SVD can stall where many
    threads compete for few cores, as inside Flower's simulation process.
    """
    if dim >= features.shape[1]:
        return features.astype(np.float32)
    x = torch.from_numpy(np.asarray(features, dtype=np.float64))
    centered = x - x.mean(dim=0, keepdim=True)
    _, vectors = torch.linalg.eigh(centered.T @ centered)
    top = vectors[:, -dim:].flip(1)  # largest components first
    reduced = centered @ top
    reduced = reduced / (reduced.std(dim=0, keepdim=True) + 1e-8)
    return (reduced / np.sqrt(dim)).float().numpy()


class RecModel(nn.Module):
    """Two-tower next-item model. See the module docstring for the equations.

    All per-item target-side parameters live in ONE row per item of `item_table`
    ([E_tgt | B | B_T], see `item_columns`): one Opacus norm computation per step instead of
    three, and the natural unit for per-item-row aggregation on the server.
    """

    def __init__(
        self,
        config: ModelConfig,
        text_features: np.ndarray,
        years: np.ndarray | None = None,
        num_local_users: int = 1,
        time_range: tuple[int, int] = (0, 1),
    ):
        super().__init__()
        self.config = config
        num_items = text_features.shape[0]
        self.num_items = num_items
        text = reduce_text_features(text_features, config.text_dim)
        buckets = year_bucket(np.zeros(num_items) if years is None else years)
        start, end = time_range
        knots = np.linspace(start, max(end, start + 1), config.time_knots, dtype=np.float64)
        # Public, frozen item features: buffers, never parameters, never sent.
        self.register_buffer("text", torch.from_numpy(text), persistent=False)
        self.register_buffer("year", torch.from_numpy(buckets), persistent=False)
        self.register_buffer("knots", torch.from_numpy(knots))

        d, t, k = config.dim, text.shape[1], config.time_knots
        self.ctx_text = nn.Linear(t, d, bias=False)
        self.tgt_text = nn.Linear(d, t, bias=False)  # W_tgt applied to q (see module docstring)
        self.id_dim = d if config.id_embeddings else 0
        if config.id_embeddings:
            self.ctx_id = nn.Embedding(num_items, d)
            nn.init.zeros_(self.ctx_id.weight)
        self.ctx_year = nn.Embedding(NUM_YEAR_BUCKETS, d)
        # Looked up at every candidate (B, 2+N): exact Gram-based DP norms are faster there.
        self.item_table = GramEmbedding(num_items, self.id_dim + 1 + k)
        self.year_table = GramEmbedding(NUM_YEAR_BUCKETS, d + 1)  # [Y_tgt | B_Y]
        # Content popularity w·t_i (`text_bias`): see ModelConfig.
        if config.text_bias:
            self.text_bias = nn.Linear(t, 1, bias=False)
            nn.init.zeros_(self.text_bias.weight)
        # Zero id rows: an unseen item is its text and year alone (cold start); small random
        # year vectors break the symmetry between the two towers.
        for table in (self.item_table, self.year_table):
            nn.init.zeros_(table.weight)
        nn.init.normal_(self.ctx_year.weight, std=0.01)
        if config.user_embedding:
            self.user = nn.Embedding(num_local_users, d)
            nn.init.zeros_(self.user.weight)
        names = {n for n, _ in self.named_parameters()}
        if unknown := set(self.trained_parameters) - names:
            raise ValueError(f"model train-only: unknown parameters {sorted(unknown)}")
        frozen = self.parameter_names(Scope.FROZEN)
        for name in frozen:
            self.get_parameter(name).requires_grad_(False)
        # fixed by the config; read per forward, and never from a weight Opacus may wrap
        self.learns_target_text = "tgt_text.weight" not in frozen
        # without a trained context-tower parameter the history-based user vector is a fixed
        # random projection, and scoring leaves it out
        self.learns_context = any(n in CONTEXT_TOWER and n not in frozen for n in names)

    @property
    def item_columns(self) -> dict[str, slice]:
        d, k = self.id_dim, self.config.time_knots
        return {
            "vector": slice(0, d),
            "bias": slice(d, d + 1),
            "time_bias": slice(d + 1, d + 1 + k),
        }

    def knot_weights(self, time: torch.Tensor) -> torch.Tensor:
        """(B,) timestamps -> (B, K) hat-function weights; times outside the span clamp to an end."""
        k = self.knots
        if len(k) == 1:
            return torch.ones(len(time), 1)
        t = time.to(k.dtype).clamp(k[0], k[-1])
        step = (k[-1] - k[0]) / (len(k) - 1)
        return (1 - ((t[:, None] - k[None, :]).abs() / step)).clamp(min=0).float()

    @property
    def serving_time(self) -> int:
        """The model serves "now": the end of the time span it was trained on."""
        return int(self.knots[-1])

    # -- the declaration of what is federated ---------------------------------------------------
    def parameter_scopes(self) -> dict[str, Scope]:
        """Every trainable parameter's scope, declared as data (tested to cover all of them)."""
        scopes = {name: Scope.GLOBAL for name in GLOBAL_PARAMETERS}
        if self.config.id_embeddings:
            scopes["ctx_id.weight"] = Scope.GLOBAL
        if self.config.text_bias:
            scopes["text_bias.weight"] = Scope.GLOBAL
        if self.config.user_embedding:
            scopes["user.weight"] = Scope.LOCAL
        if trained := self.trained_parameters:
            for name, scope in scopes.items():
                if scope is Scope.GLOBAL and name not in trained:
                    scopes[name] = Scope.FROZEN
        return scopes

    @property
    def trained_parameters(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.config.train_only.split(",") if n.strip())

    def parameter_names(self, scope: Scope) -> list[str]:
        return [name for name, s in self.parameter_scopes().items() if s is scope]

    # -- training forward -----------------------------------------------------------------------
    def context_vectors(
        self, items: torch.Tensor, taps: GradientTaps | None = None
    ) -> torch.Tensor:
        """q for a tensor of item indices of any shape (...,) -> (..., d)."""
        q = _linear(self.ctx_text, self.text[items], taps)
        q = q + _lookup(self.ctx_year, self.year[items], taps)
        return q + _lookup(self.ctx_id, items, taps) if self.config.id_embeddings else q

    def context_parameter_names(self) -> list[str]:
        """The trainable parameters only a context ITEM reaches (the context tower): a
        single-interaction example (`forward` with `first=None`) gives them no gradient."""
        names = ["ctx_text.weight", "ctx_year.weight"]
        names += ["ctx_id.weight"] if self.config.id_embeddings else []
        return [n for n in names if self.get_parameter(n).requires_grad]

    def forward(
        self,
        first: torch.Tensor | None,
        second: torch.Tensor,
        negatives: torch.Tensor,
        time: torch.Tensor,
        user: torch.Tensor | None = None,
        taps: GradientTaps | None = None,
    ) -> torch.Tensor:
        """Logits of a pair example in both directions against shared sampled negatives, or of
        a single-interaction example (`first=None`) in its one direction.

        first, second: (B,) item indices of the pair; negatives: (B, N) catalogue samples;
        first=None: `second` is the only interaction and the context is empty (q = 0, plus
        the local user vector if any), so the score is the item's global part (biases at
        `time`) and the example's gradient depends on no other interaction;
        time: (B,) the example's timestamp (selects the time-varying bias it trains);
        user: (B,) local user indices, only with `user_embedding`.
        taps: record every trainable weight's use for fused per-example clipping
        (`fedrec.common.privacy.dpsgd.clip_per_example`); the logits are the same.
        Returns (B, 2, 1+N): slot 0 scores [second, negatives...] given first, slot 1 scores
        [first, negatives...] given second; (B, 1, 1+N) for a single interaction; the true
        item is always column 0.
        """
        d = self.config.dim
        q, targets = self._queries(first, second, user, taps)
        s = targets.shape[1]
        candidates = torch.cat([targets, negatives], dim=1)  # (B, C=S+N)
        rows = _lookup(self.item_table, candidates, taps)  # (B, C, d+1+K)
        years = _lookup(self.year_table, self.year[candidates], taps)  # (B, C, d+1)
        e = self.id_dim  # id-vector columns of the item table (0 for a content model)
        vectors = years[..., :d] + (rows[..., :e] if e else 0)  # (B, C, d)
        time_bias = torch.einsum("bck,bk->bc", rows[..., e + 1 :], self.knot_weights(time))
        item_bias = rows[..., e] + time_bias
        if self.config.text_bias:
            item_bias = item_bias + _linear(self.text_bias, self.text[candidates], taps)[..., 0]
        bias = self.config.bias_scale * item_bias + years[..., d]  # (B, C)
        if first is None and not self.config.user_embedding and not self.learns_target_text:
            # q = 0: the personal terms are zero and, with W_tgt frozen, train nothing
            return bias[:, None, :]
        logits = torch.einsum("bsd,bcd->bsc", q, vectors)  # (B, S, C)
        projected = _linear(self.tgt_text, q, taps)
        logits = logits + torch.einsum("bst,bct->bsc", projected, self.text[candidates])
        logits = logits + bias[:, None, :]
        target = torch.diagonal(logits[:, :, :s], dim1=1, dim2=2)  # (B, S): slot k's own target
        return torch.cat([target[..., None], logits[:, :, s:]], dim=-1)

    def forward_shared(
        self,
        first: torch.Tensor | None,
        second: torch.Tensor,
        negatives: torch.Tensor,
        time: torch.Tensor,
        user: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The logits of `forward`, for plain (non-DP) training, at a fraction of the cost.

        `forward` gathers every candidate's table rows per example, (B, C, ...) tensors whose
        backward dominates a step; here a candidate's target vector v_c + W_tgt^T t_c and bias
        parts are formed once per distinct item, and contexts meet them in batched products.
        `negatives` is (B, N) per example, or (1, N) shared by the whole batch: then the negative
        logits are one (B*S, d) x (d, N) product. Same equations and gradients as `forward` with
        the same negatives (tested). The batch shares work, so this is not the per-example
        clipping path: DP-SGD uses `forward`.
        """
        q, targets = self._queries(first, second, user)
        personal = self.config.user_embedding or self.learns_target_text or first is not None
        knots = self.knot_weights(time)  # (B, K)
        scale = self.config.bias_scale

        vectors, static, timed, year_bias = self._candidate_parts(targets)  # (B, S, ...)
        bias = scale * (static + torch.einsum("bsk,bk->bs", timed, knots)) + year_bias
        target = bias + ((q * vectors).sum(-1) if personal else 0)  # (B, S)

        shared = negatives.shape[0] == 1 and len(second) != 1
        items, inverse = (
            (negatives[0], None) if shared else torch.unique(negatives, return_inverse=True)
        )
        vectors, static, timed, year_bias = self._candidate_parts(items)  # (U, ...)
        if shared:  # (B, N): every example meets the same N items
            bias = scale * (static[None, :] + knots @ timed.T) + year_bias[None, :]
            scores = q @ vectors.T if personal else 0  # (B, S, N)
        else:  # (B, N): each example's own negatives, gathered from the distinct ones
            time_bias = torch.einsum("bnk,bk->bn", timed[inverse], knots)
            bias = scale * (static[inverse] + time_bias) + year_bias[inverse]
            scores = torch.einsum("bsd,bnd->bsn", q, vectors[inverse]) if personal else 0
        negative = (scores + bias[:, None, :]).expand(len(second), q.shape[1], -1)
        return torch.cat([target[..., None], negative], dim=-1)  # (B, S, 1+N)

    def _queries(
        self,
        first: torch.Tensor | None,
        second: torch.Tensor,
        user: torch.Tensor | None,
        taps: GradientTaps | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The query vectors q (B, S, d) of an example and its targets (B, S): S = 2 for a
        pair (each item the other's context), S = 1 with q = 0 for a single interaction;
        plus the local user vector, if the model has one."""
        if first is None:
            q = torch.zeros(len(second), 1, self.config.dim)  # (B, 1, d): no context item
            targets = second[:, None]  # (B, 1)
        else:
            q = self.context_vectors(torch.stack([first, second], dim=1), taps)  # (B, 2, d)
            targets = torch.stack([second, first], dim=1)  # (B, 2)
        if self.config.user_embedding:
            if user is None:
                raise ValueError("this model has a local user embedding: pass `user`")
            q = q + _lookup(self.user, user.unsqueeze(1), taps)  # (B, 1, d): batch-first
        return q, targets

    def _candidate_parts(
        self, items: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target-side parts of items (...,): vector v + W_tgt^T t (..., d), static item bias
        (...,), time-bias knots (..., K) and year bias (...,), biases before `bias_scale`."""
        d, e = self.config.dim, self.id_dim
        rows = self.item_table(items)  # (..., e+1+K)
        years = self.year_table(self.year[items])  # (..., d+1)
        vectors = years[..., :d] + self.text[items] @ self.tgt_text.weight
        if e:
            vectors = vectors + rows[..., :e]
        static = rows[..., e]
        if self.config.text_bias:
            static = static + self.text_bias(self.text[items])[..., 0]
        return vectors, static, rows[..., e + 1 :], years[..., d]

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def item_vectors(self, now: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(I, d) target vectors and (I,) biases of the whole catalogue at time `now`
        (default: the serving time, the end of the training span)."""
        d = self.config.dim
        table, years = self.item_table.weight, self.year_table.weight[self.year]
        e = self.id_dim
        v = self.text @ self.tgt_text.weight + years[:, :d] + (table[:, :e] if e else 0)
        now = torch.tensor([self.serving_time if now is None else now], dtype=torch.int64)
        b = table[:, e] + table[:, e + 1 :] @ self.knot_weights(now)[0]
        if self.config.text_bias:
            b = b + self.text_bias(self.text)[:, 0]
        b = self.config.bias_scale * b + years[:, d]
        return v, b

    @torch.no_grad()
    def all_context_vectors(self) -> torch.Tensor:
        return self.context_vectors(torch.arange(self.num_items, device=self.text.device))


def _linear(layer: nn.Linear, x: torch.Tensor, taps: GradientTaps | None) -> torch.Tensor:
    return layer(x) if taps is None else taps.linear(layer, x)


def _lookup(layer: nn.Embedding, index: torch.Tensor, taps: GradientTaps | None) -> torch.Tensor:
    return layer(index) if taps is None else taps.embedding(layer, index)


GLOBAL_PARAMETERS = (
    "ctx_text.weight",
    "tgt_text.weight",
    "ctx_year.weight",
    "item_table.weight",
    "year_table.weight",
)
CONTEXT_TOWER = ("ctx_text.weight", "ctx_year.weight", "ctx_id.weight")


def served_bias_weights(model: RecModel) -> np.ndarray:
    """(columns of the item table,) weights whose product with an item's row is its served
    bias at the serving time (`RecModel.item_vectors`, without the text and year terms)."""
    columns = model.item_columns
    w = np.zeros(model.item_table.weight.shape[1])
    w[columns["bias"]] = 1.0
    now = torch.tensor([model.serving_time], dtype=torch.int64)
    w[columns["time_bias"]] = model.knot_weights(now)[0].numpy()
    return w * model.config.bias_scale


def history_weights(lengths: np.ndarray, half_life: float) -> np.ndarray:
    """Recency weights for concatenated histories: the k-th most recent item gets 2^(-k/h)."""
    total = int(lengths.sum())
    ends = np.repeat(np.cumsum(lengths), lengths)
    age = ends - np.arange(total) - 1  # 0 for each user's most recent item
    return np.power(2.0, -age / max(half_life, 1e-6)).astype(np.float32)


def catalogue_vectors(
    model: RecModel, now: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item target vectors, item biases at `now`, item context vectors) of the catalogue."""
    model.eval()
    vectors, bias = (x.numpy() for x in model.item_vectors(now))
    context = model.all_context_vectors().numpy()
    if not model.learns_context:
        # an untrained context tower only adds a fixed random term to every score
        context = np.zeros_like(context)
    return vectors, bias, context


class ModelScorer:
    """Ranks the catalogue for users from their history: the on-device inference path.

    user vector u = recency-weighted mean of q over the user's history (zero for a user with no
    history, who then gets the model's popularity prior b); score = u . v + b.
    """

    def __init__(
        self,
        model: RecModel,
        history: UserHistories,
        now: int | None = None,
        catalogue: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ):
        """`catalogue`: `catalogue_vectors(model, now)` computed once for many scorers of the
        same global parameters (the user-independent part of scoring)."""
        model.eval()
        self.history = history
        if catalogue is None:
            catalogue = catalogue_vectors(model, now)
        self.item_vecs, self.item_bias, self.ctx_vecs = catalogue
        self.half_life = model.config.history_half_life
        self.user_vecs = model.user.weight.detach().numpy() if model.config.user_embedding else None

    def user_vectors(self, users: np.ndarray) -> np.ndarray:
        starts, ends = self.history.indptr[users], self.history.indptr[users + 1]
        lengths = ends - starts
        idx = np.concatenate([self.history.items[s:e] for s, e in zip(starts, ends, strict=True)])
        weights = history_weights(lengths, self.half_life)
        owner = np.repeat(np.arange(len(users)), lengths)
        u = np.zeros((len(users), self.ctx_vecs.shape[1]), dtype=np.float32)
        np.add.at(u, owner, self.ctx_vecs[idx.astype(np.int64)] * weights[:, None])
        norm = np.zeros(len(users), dtype=np.float32)
        np.add.at(norm, owner, weights)
        u /= np.maximum(norm, 1e-12)[:, None]
        if self.user_vecs is not None:  # one row on a device, one per user when centralized
            u = u + (self.user_vecs[users] if len(self.user_vecs) > 1 else self.user_vecs[0])
        return u

    def __call__(self, users: np.ndarray) -> np.ndarray:
        return self.user_vectors(users) @ self.item_vecs.T + self.item_bias[None, :]
