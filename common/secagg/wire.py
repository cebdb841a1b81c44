"""SecAgg+ stage messages as flat mappings of ints, bytes and lists of them (what a Flower
ConfigRecord carries), and back. A mapping {device: bytes} becomes two parallel lists,
"<name>/ids" and "<name>/data"; an empty one is left out (a record cannot type an empty list).
Each round runs two instances ("updates", "counters": `fedrec.common.secagg.round_inputs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# A stage message's config record names its stage under STAGE_KEY; a device's reply carries
# its protocol fields in the SECAGG_KEY record and its masked inputs in the MASKED_KEY arrays.
STAGE_KEY, SECAGG_KEY, MASKED_KEY = "stage", "secagg", "masked"
INSTANCES = ("updates", "counters")
KEYS = ("pk_c", "pk_s")


class MalformedStage(ValueError):
    """A stage message that lacks a field or whose lists do not match."""


def pack_map(name: str, mapping: Mapping[int, bytes]) -> dict[str, Any]:
    if not mapping:
        return {}
    ids = sorted(mapping)
    return {f"{name}/ids": [int(i) for i in ids], f"{name}/data": [bytes(mapping[i]) for i in ids]}


def unpack_map(name: str, fields: Mapping[str, Any]) -> dict[int, bytes]:
    ids, data = list(fields.get(f"{name}/ids", [])), list(fields.get(f"{name}/data", []))
    if len(ids) != len(data):
        raise MalformedStage(f"{name}: {len(ids)} ids for {len(data)} values")
    if len(set(ids)) != len(ids):
        raise MalformedStage(f"{name}: a device appears twice")
    return {int(i): bytes(d) for i, d in zip(ids, data, strict=True)}


def pack_keys(adverts: tuple[Mapping[str, bytes], Mapping[str, bytes]]) -> dict[str, bytes]:
    """A device's stage-0 reply: its public keys of both instances."""
    return {
        f"{inst}/{k}": bytes(a[k]) for inst, a in zip(INSTANCES, adverts, strict=True) for k in KEYS
    }


def unpack_keys(fields: Mapping[str, Any]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    try:
        updates, tallies = ({k: bytes(fields[f"{inst}/{k}"]) for k in KEYS} for inst in INSTANCES)
    except KeyError as err:
        raise MalformedStage(f"keys: no {err.args[0]!r}") from None
    return updates, tallies


def pack_roster(roster: Mapping[str, Mapping[int, Mapping[str, bytes]]]) -> dict[str, Any]:
    """The server's stage-1 request: every instance's roster {device: {pk_c, pk_s}}."""
    out: dict[str, Any] = {}
    for inst in INSTANCES:
        for k in KEYS:
            out |= pack_map(f"roster/{inst}/{k}", {i: e[k] for i, e in roster[inst].items()})
    return out


def unpack_roster(fields: Mapping[str, Any]) -> dict[str, dict[int, dict[str, bytes]]]:
    out: dict[str, dict[int, dict[str, bytes]]] = {}
    for inst in INSTANCES:
        c, s = (unpack_map(f"roster/{inst}/{k}", fields) for k in KEYS)
        if set(c) != set(s):
            raise MalformedStage(f"roster/{inst}: the two key lists name different devices")
        out[inst] = {i: {"pk_c": c[i], "pk_s": s[i]} for i in c}
    return out


def pack_pair(name: str, pair: tuple[Mapping[int, bytes], Mapping[int, bytes]]) -> dict[str, Any]:
    """One {device: bytes} mapping per instance (stage-1 shares out, routed shares in)."""
    out: dict[str, Any] = {}
    for inst, mapping in zip(INSTANCES, pair, strict=True):
        out |= pack_map(f"{name}/{inst}", mapping)
    return out


def unpack_pair(name: str, fields: Mapping[str, Any]) -> tuple[dict[int, bytes], dict[int, bytes]]:
    updates, tallies = (unpack_map(f"{name}/{inst}", fields) for inst in INSTANCES)
    return updates, tallies


def pack_unmask(responses: tuple[Mapping[str, Mapping[int, bytes]], ...]) -> dict[str, Any]:
    """A survivor's stage-3 reply: per instance the b-shares of survivors and the s-key shares
    of dropouts it holds."""
    out: dict[str, Any] = {}
    for inst, response in zip(INSTANCES, responses, strict=True):
        for kind in ("seed_shares", "sk_shares"):
            out |= pack_map(f"{inst}/{kind}", response[kind])
    return out


def unpack_unmask(fields: Mapping[str, Any]) -> tuple[dict[str, dict[int, bytes]], ...]:
    return tuple(
        {kind: unpack_map(f"{inst}/{kind}", fields) for kind in ("seed_shares", "sk_shares")}
        for inst in INSTANCES
    )
