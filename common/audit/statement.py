"""The DP statement of each guarantee, with what "How to DP-fy ML" (Ponomareva et al. 2023,
Sec. 5.3) asks a statement to give: unit of privacy, adjacency, accountant, δ, σ, sampling
rate and method, steps, clipping norm, budget, and the distribution of ε actually spent."""

from __future__ import annotations

import math
from typing import Any

from fedrec.common.audit.ledgers import DISTRIBUTED, LOCAL

USER = "user"

_THREAT = {
    LOCAL: "anyone, the server included, who sees a device's update; trusts nothing but the "
    "device's own noise",
    DISTRIBUTED: "an honest-but-curious server that sees only the secure-aggregated sum of the "
    "devices' updates; assumes secure aggregation holds, the server does not collude with "
    "the other devices, and they added their noise honestly",
    USER: "anyone who sees the published global models; trusts the server to sample, clip "
    "and add the noise",
}
# The neighbouring datasets each guarantee is stated for, as the run defines them: user-level
# DP under zero-out (the sampled Gaussian's RDP bound holds for it as for add/remove, so the
# same accountant applies), per-interaction DP under add/remove.
_INTERACTION = (
    "add/remove: one interaction added to or removed from one device's data (the rest, "
    "and every other device, unchanged)"
)
ADJACENCY = {
    USER: "zero-out: one device's data replaced by none; the device is still sampled and, "
    "under 'distributed', still sends its noise share (Kairouz et al. 2021)",
    LOCAL: _INTERACTION,
    DISTRIBUTED: _INTERACTION,
}
_SIGMA = {
    LOCAL: "σ_dev per step (the device's own noise)",
    DISTRIBUTED: "σ_dev·√min(n, K_min) per step (n = recorded survivors, K_min if none)",
}


def guarantee_kind(g: dict[str, Any]) -> str | None:
    """Which recomputation a guarantee of summary.json is checked against."""
    name = str(g.get("name", ""))
    if name.startswith("user-level"):
        return USER
    if "against the server" in name:
        return DISTRIBUTED
    if "local DP" in name:
        return LOCAL
    return None


def statements(
    summary: dict[str, Any] | None, figures: dict[str, Any], per_view: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every guarantee the run claims (or, for bare ledgers, each view they allow)."""
    claimed = (summary or {}).get("privacy", {}).get("guarantees")
    if claimed is None:
        claimed = [{"name": f"per-interaction DP, {v} view", "_kind": v} for v in per_view]
    out = []
    for g in claimed:
        kind = g.get("_kind") or guarantee_kind(g)
        if kind == USER:
            out.append(_user(g, figures))
        elif kind in per_view:
            out.append(_interaction(g, kind, figures, per_view[kind]))
        else:
            out.append({"name": g.get("name"), "checked": False, "why": "unknown guarantee"})
    return out


def _interaction(g, view, figures, fig) -> dict[str, Any]:
    mechs = figures["mechanisms"]
    budget = figures["budget"]
    return {
        "name": g.get("name"),
        "kind": view,
        "unit": "one interaction (one training example)",
        "adjacency": ADJACENCY[view],
        "adjacency_stated": g.get("adjacency"),
        "threat_model": g.get("threat_model") or _THREAT[view],
        "audit_threat_model": _THREAT[view],
        "accountant": figures["accountant"]["rdp"] + "; PLD for the tighter value",
        "delta": figures["delta"],
        "sigma": _SIGMA[view],
        "device_noise_multipliers": sorted({m["noise_multiplier"] for m in mechs}),
        "aggregate_noise_multipliers": sorted(
            {m["aggregate_noise_multiplier"] for m in mechs if m["aggregate_noise_multiplier"]}
        ),
        "min_survivors": sorted({m["min_survivors"] for m in mechs if m["min_survivors"]}),
        "sampling": "Poisson sampling of each interaction per step, rate "
        + ", ".join(f"{q:g}" for q in sorted({m["sample_rate"] for m in mechs})),
        "steps_per_round": sorted({m["steps"] for m in mechs}),
        "steps_per_interaction": fig.get("steps"),
        "clip_norm": sorted({m["clip_norm"] for m in mechs}),
        "budget": budget["epsilon"] if budget and budget["view"] == view else None,
        "epsilon_reported": g.get("epsilon"),
        "epsilon_recomputed_rdp": fig["max_epsilon_rdp"],
        "epsilon_recomputed_pld": fig["max_epsilon_pld"],
        "epsilon_spent": fig["epsilon_rdp"],
        "remaining_budget": fig.get("remaining_budget"),
        "earned": g.get("earned", True),
        "why_not": g.get("why_not"),
    }


def _user(g, figures) -> dict[str, Any]:
    user = figures.get("user_level") or {}
    mechs = user.get("mechanisms", [])
    return {
        "name": g.get("name"),
        "kind": USER,
        "unit": "one device (all its interactions in all rounds)",
        "adjacency": ADJACENCY[USER],
        "adjacency_stated": g.get("adjacency"),
        "threat_model": g.get("threat_model") or _THREAT[USER],
        "audit_threat_model": _THREAT[USER],
        "accountant": figures["accountant"]["rdp"] + "; PLD for the tighter value",
        "delta": g.get("delta"),
        "sigma": sorted({m["noise_multiplier"] for m in mechs}),
        "sampling": "Poisson sampling of each registered device per round, rate "
        + ", ".join(f"{m['sample_rate']:g}" for m in mechs),
        "devices_sampled_per_round": _mean(user.get("sampled_per_round")),
        "steps": user.get("rounds"),
        "clip_norm": sorted({m["clip_norm"] for m in mechs}),
        "budget": user.get("budget"),
        "epsilon_reported": g.get("epsilon"),
        "epsilon_recomputed_rdp": user.get("epsilon_rdp"),
        "epsilon_recomputed_pld": user.get("epsilon_pld"),
        "epsilon_spent": "one ε for every device (user-level accounting is not per device)",
        "earned": g.get("earned", True),
        "why_not": g.get("why_not"),
    }


def _mean(values: list | None) -> float | None:
    values = [v for v in values or [] if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.4g}"
    return str(x)
