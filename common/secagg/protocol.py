r"""SecAgg+ (Bell, Bonawitz, Gascón, Lepoint & Raykova 2020, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS; Algorithm 2, semi-honest variant) as plain state machines.

The server learns Σ_{i∈S} x_i mod 2^b over the survivors S, and nothing else about any x_i,
provided at least `min_survivors` (K_min) devices are in S and fewer than `threshold` (t) of
any device's share holders collude with it. Stages, each one message each way:
  0. advertise keys: each device sends two X25519 public keys, c (to encrypt shares) and
     s (pairwise masks). The server forwards the roster U1 to all.
  1. share keys: the public graph (`neighbour_graph`, k neighbours each, from the round's public
     seed) fixes N(i). Device i draws a self-mask seed b_i and Shamir-shares b_i and its secret
     key s_i among N(i) ∪ {i}, threshold t; each share is encrypted to its holder under the
     ECDH key of their c keys. U2: the devices that sent shares.
  2. masked input: y_i = x_i + PRG(b_i) + Σ_{j∈N(i)∩U2} ±PRG(s_ij) mod 2^b, s_ij from ECDH of
     the s keys, + if i < j and - otherwise, so a pair's masks cancel in the sum. U3: senders.
  3. unmask: the server announces survivors U3 and dropouts U2 \ U3; each survivor reveals the
     b-shares it holds of survivors and the s-key shares it holds of dropouts, never both for
     one device, and refuses outright if fewer than K_min survivors are announced. The server
     rebuilds each b_j of U3 and each s_j of the dropouts from ≥ t shares, removes self masks
     and the dropouts' dangling pairwise masks.
Security needs 2t > k + 1 (a majority of each device's share holders), checked in the config.
Not covered: the malicious-server variant (signed rosters, a consistency-check round), and
input validation (a device's x_i is trusted to be a well-formed encoding).

Primitives: Flower's share serialisation (`flwr.common.secure_aggregation.secaggplus_utils`);
X25519, HKDF and AES-256-GCM (the shares' authenticated encryption, the pair's ids as associated
data) from `cryptography`; Shamir sharing over GF(2^521 - 1) (`fedrec.common.secagg.shamir`:
Flower's, over GF(2^128) in pure Python, cost ~0.1 s of each device's round; Flower's Fernet
cost another ~2 ms per device at 24 neighbours, GCM a tenth of it). Masks are expanded with AES-256-CTR (not Flower's `pseudo_rand_gen`, which
folds the seed to 32 bits into numpy's RandomState). Messages are plain dicts of ints, bytes and
numpy arrays so that they map onto Flower's ConfigRecord / ArrayRecord.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fedrec.common.secagg import shamir
from fedrec.common.secagg.encoding import MAX_BITS

Entropy = Callable[[int], bytes]
DeviceId = int


class SecAggRefusal(RuntimeError):
    """A device declines a request that would weaken the protocol's guarantee."""


class SecAggAbort(RuntimeError):
    """The server cannot finish the round (too few survivors or shares)."""


@dataclass(frozen=True)
class SecAggConfig:
    """One round's public parameters, the same for the server and every device."""

    bits: int  # the sum is mod 2^bits
    length: int  # coordinates of each device's input vector
    degree: int  # k: neighbours per device (all others when k >= n - 1)
    threshold: int  # t: shares that rebuild a device's secret (of its k + 1)
    min_survivors: int  # K_min: no unmasking with fewer survivors
    public_seed: int  # the neighbour graph's randomness (public)

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in [1, {MAX_BITS}]")
        if self.length < 1 or self.degree < 1 or self.min_survivors < 1:
            raise ValueError("length, degree and min_survivors must be >= 1")
        if not (self.degree + 1) / 2 < self.threshold <= self.degree + 1:
            raise ValueError("threshold must be a majority of a device's k + 1 share holders")


def neighbour_graph(
    ids: Sequence[DeviceId], degree: int, public_seed: int
) -> dict[DeviceId, frozenset[DeviceId]]:
    """Each device's neighbours: a Harary-like ring over a public shuffle of `ids`, each
    joined to ⌈k/2⌉ devices on either side (so k rounded up to even), or to all others when
    that covers everyone. Symmetric; every device computes the same graph."""
    return dict(_graph(tuple(sorted(set(ids))), degree, int(public_seed)))


@lru_cache(maxsize=8)
def _graph(
    order: tuple[DeviceId, ...], degree: int, public_seed: int
) -> Mapping[DeviceId, frozenset[DeviceId]]:
    """`neighbour_graph` of sorted ids, built once per round and instance: every device of a
    round asks for the same graph, and building it is O(n·k)."""
    n = len(order)
    rng = np.random.default_rng([public_seed, n, 0x5EC])
    shuffled = [order[i] for i in rng.permutation(n)]
    half = (degree + 1) // 2
    if 2 * half >= n - 1:
        everyone = frozenset(shuffled)
        return MappingProxyType({i: everyone - {i} for i in shuffled})
    return MappingProxyType(
        {
            shuffled[p]: frozenset(shuffled[(p + off) % n] for off in range(-half, half + 1) if off)
            for p in range(n)
        }
    )


def _keystream(seed: bytes, length: int) -> np.ndarray:
    """(length,) uint64 words of the AES-256-CTR keystream under SHA-256(seed): a mask before
    its reduction mod 2^bits (sums of them may wrap mod 2^64, a multiple of 2^bits)."""
    key = hashlib.sha256(b"fedrec secagg mask v1" + seed).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(stream.update(bytes(8 * length)), dtype=np.uint64)


def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """(length,) uint64 uniform residues mod 2^bits: AES-256-CTR keystream under SHA-256(seed)
    (a power-of-2 modulus makes the masked words exactly uniform)."""
    return _keystream(seed, length) & np.uint64((1 << bits) - 1)


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _agree_with(private: X25519PrivateKey, public: bytes, label: bytes) -> bytes:
    """32 bytes both ends of an X25519 exchange derive (HKDF-SHA256 with a purpose label)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(shared)


def _share_cipher(private: X25519PrivateKey, public: bytes) -> AESGCM:
    return AESGCM(_agree_with(private, public, b"fedrec secagg shares"))


def _pair_label(src: DeviceId, dst: DeviceId) -> bytes:
    return b"fedrec secagg share %d -> %d" % (src, dst)


def _seal(cipher: AESGCM, plaintext: bytes, src: DeviceId, dst: DeviceId) -> bytes:
    """nonce ‖ AES-256-GCM(plaintext), bound to the pair (a fresh 96-bit random nonce)."""
    nonce = os.urandom(12)
    return nonce + cipher.encrypt(nonce, plaintext, _pair_label(src, dst))


def _open(cipher: AESGCM, sealed: bytes, src: DeviceId, dst: DeviceId) -> bytes:
    try:
        return cipher.decrypt(sealed[:12], sealed[12:], _pair_label(src, dst))
    except InvalidTag as err:
        raise SecAggRefusal(f"shares from {src} fail authentication") from err


def _pair_seed(private: X25519PrivateKey, public: bytes) -> bytes:
    return _agree_with(private, public, b"fedrec secagg pair mask")


def _pair_sign(i: DeviceId, j: DeviceId) -> int:
    return 1 if i < j else -1


class _MaskSum:
    """Σ ± keystream words in uint64, reduced mod 2^bits once at the end (wrapping mod 2^64
    along the way changes nothing mod 2^bits): one pass per mask instead of two."""

    def __init__(self, start: np.ndarray) -> None:
        self.total = np.array(start, dtype=np.uint64)

    def add(self, words: np.ndarray, sign: int) -> None:
        if sign > 0:
            self.total += words
        else:
            self.total -= words

    def residues(self, bits: int) -> np.ndarray:
        return self.total & np.uint64((1 << bits) - 1)


class SecAggDevice:
    """One device's side of a round; call the stages in order, each at most once."""

    def __init__(
        self, device_id: DeviceId, config: SecAggConfig, *, entropy: Entropy = os.urandom
    ) -> None:
        self.id = device_id
        self.config = config
        self._entropy = entropy
        self._sk_c, self._sk_s = entropy(32), entropy(32)  # X25519 secrets: any 32 bytes
        self._key_c = X25519PrivateKey.from_private_bytes(self._sk_c)
        self._key_s = X25519PrivateKey.from_private_bytes(self._sk_s)
        self._adverts = {"pk_c": _public_bytes(self._key_c), "pk_s": _public_bytes(self._key_s)}
        self._self_seed = b""
        self._roster: dict[DeviceId, dict[str, bytes]] = {}  # its neighbours' and its own keys
        self._roster_ids: frozenset[DeviceId] = frozenset()
        self.neighbours: frozenset[DeviceId] = frozenset()
        self._share_keys: dict[DeviceId, AESGCM] = {}  # cipher shared with each share holder
        self._seed_shares: dict[DeviceId, bytes] = {}  # b_j shares this device holds
        self._sk_shares: dict[DeviceId, bytes] = {}  # s_j shares this device holds
        self._partners: frozenset[DeviceId] = frozenset()  # neighbours it masked with
        self._answered = False

    def __getstate__(self) -> dict:
        # A deployed device keeps its session between the round's messages as bytes
        # (`context.state`); the key and cipher objects do not pickle, their secrets do.
        state = self.__dict__.copy()
        del state["_key_c"], state["_key_s"]
        state["_share_keys"] = {}  # rebuilt from the secret when a stage needs it
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._key_c = X25519PrivateKey.from_private_bytes(self._sk_c)
        self._key_s = X25519PrivateKey.from_private_bytes(self._sk_s)

    def advertise_keys(self) -> dict[str, bytes]:
        """Stage 0: the public keys c (share encryption) and s (pairwise masks)."""
        return dict(self._adverts)

    def share_keys(self, roster: Mapping[DeviceId, Mapping[str, bytes]]) -> dict[DeviceId, bytes]:
        """Stage 1: {neighbour: encrypted shares of b and s for it}, from U1's keys."""
        if dict(roster.get(self.id, {})) != self._adverts:
            raise SecAggRefusal("the roster does not carry this device's keys")
        self._roster_ids = frozenset(roster)
        self.neighbours = _graph(
            tuple(sorted(self._roster_ids)), self.config.degree, int(self.config.public_seed)
        )[self.id]
        # only the neighbours' keys are ever used (shares, pairwise masks): O(k), not O(n)
        self._roster = {i: dict(roster[i]) for i in self.neighbours | {self.id}}
        keys = [k for entry in self._roster.values() for k in (entry["pk_c"], entry["pk_s"])]
        if len(set(keys)) != len(keys):
            raise SecAggRefusal("public keys repeat among this device's neighbours")
        holders = sorted(self.neighbours | {self.id})
        if len(holders) < self.config.threshold:
            raise SecAggRefusal("fewer share holders than the threshold")
        self._self_seed = self._entropy(32)
        b_shares = shamir.split(self._self_seed, self.config.threshold, len(holders))
        s_shares = shamir.split(self._sk_s, self.config.threshold, len(holders))
        out: dict[DeviceId, bytes] = {}
        for holder, b_share, s_share in zip(holders, b_shares, s_shares, strict=True):
            if holder == self.id:
                self._seed_shares[self.id], self._sk_shares[self.id] = b_share, s_share
                continue
            key = self._share_keys[holder] = _share_cipher(self._key_c, roster[holder]["pk_c"])
            plain = share_keys_plaintext_concat(self.id, holder, b_share, s_share)
            out[holder] = _seal(key, plain, self.id, holder)
        return out

    def masked_input(self, ciphertexts: Mapping[DeviceId, bytes], vector: np.ndarray) -> np.ndarray:
        """Stage 2: the masked input mod 2^b, given the shares U2's neighbours sent it."""
        cfg = self.config
        x = np.asarray(vector)
        if x.shape != (cfg.length,) or x.dtype != np.uint64:
            raise ValueError(f"input must be uint64 of shape ({cfg.length},)")
        if not set(ciphertexts) <= self.neighbours:
            raise SecAggRefusal("shares from devices that are not neighbours")
        if len(ciphertexts) + 1 < cfg.threshold:
            raise SecAggRefusal("too few neighbours left to share with")
        for src, ciphertext in ciphertexts.items():
            key = self._share_keys.get(src) or _share_cipher(self._key_c, self._roster[src]["pk_c"])
            plain = _open(key, ciphertext, src, self.id)
            actual_src, dst, b_share, s_share = share_keys_plaintext_separate(plain)
            if (actual_src, dst) != (src, self.id):
                raise SecAggRefusal(f"shares from {src} are labelled {actual_src} -> {dst}")
            self._seed_shares[src], self._sk_shares[src] = b_share, s_share
        self._partners = frozenset(ciphertexts)
        y = _MaskSum(x)
        y.add(_keystream(self._self_seed, cfg.length), 1)
        for j in sorted(self._partners):
            seed = _pair_seed(self._key_s, self._roster[j]["pk_s"])
            y.add(_keystream(seed, cfg.length), _pair_sign(self.id, j))
        return y.residues(cfg.bits)

    def self_mask(self) -> np.ndarray:
        return expand_mask(self._self_seed, self.config.length, self.config.bits)

    def unmask(
        self, survivors: Sequence[DeviceId], dropouts: Sequence[DeviceId]
    ) -> dict[str, dict[DeviceId, bytes]]:
        """Stage 3: {"seed_shares": survivors' b-shares, "sk_shares": dropouts' s-shares}
        it holds. Refuses a second request, too few survivors, a device in both lists or one
        not in the roster (a semi-honest check: a malicious server could still call roster
        devices survivors that are not; the malicious variant's consistency round is not here)."""
        if self._answered:
            raise SecAggRefusal("already answered an unmask request this round")
        alive, dead = set(survivors), set(dropouts)
        if len(alive) < self.config.min_survivors:
            raise SecAggRefusal(
                f"{len(alive)} survivors announced, fewer than K_min = {self.config.min_survivors}"
            )
        if alive & dead or self.id not in alive or not (alive | dead) <= self._roster_ids:
            raise SecAggRefusal("inconsistent survivor and dropout lists")
        self._answered = True
        return {
            "seed_shares": {j: s for j, s in self._seed_shares.items() if j in alive},
            "sk_shares": {j: s for j, s in self._sk_shares.items() if j in dead},
        }


class SecAggServer:
    """The server's side of a round: routes messages, then rebuilds the survivors' sum."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self._roster: dict[DeviceId, dict[str, bytes]] = {}
        self._graph: Mapping[DeviceId, frozenset[DeviceId]] = {}
        self._u2: frozenset[DeviceId] = frozenset()
        self._masked: dict[DeviceId, np.ndarray] = {}
        self.survivors: list[DeviceId] = []
        self.dropouts: list[DeviceId] = []

    def collect_keys(
        self, adverts: Mapping[DeviceId, Mapping[str, bytes]]
    ) -> dict[DeviceId, dict[str, bytes]]:
        """Stage 0 replies -> the roster U1 every device receives."""
        if len(adverts) < self.config.min_survivors:
            raise SecAggAbort(f"{len(adverts)} devices advertised keys, K_min is larger")
        self._roster = {i: {"pk_c": a["pk_c"], "pk_s": a["pk_s"]} for i, a in adverts.items()}
        self._graph = _graph(
            tuple(sorted(self._roster)), self.config.degree, int(self.config.public_seed)
        )
        return self._roster

    def route_shares(
        self, outgoing: Mapping[DeviceId, Mapping[DeviceId, bytes]]
    ) -> dict[DeviceId, dict[DeviceId, bytes]]:
        """Stage 1 replies -> {device: {source: ciphertext}} for each device of U2."""
        u2 = frozenset(outgoing) & frozenset(self._roster)
        if len(u2) < self.config.min_survivors:
            raise SecAggAbort(f"{len(u2)} devices shared keys, fewer than K_min")
        for src in u2:
            if not set(outgoing[src]) <= self._graph[src]:
                raise SecAggAbort(f"device {src} sent shares to non-neighbours")
        self._u2 = u2
        routed: dict[DeviceId, dict[DeviceId, bytes]] = {dst: {} for dst in sorted(u2)}
        for src in sorted(u2):  # O(n·k): each source's shares go to its own neighbours
            for dst, ciphertext in outgoing[src].items():
                if dst in routed:
                    routed[dst][src] = ciphertext
        return routed

    def collect_masked(
        self, masked: Mapping[DeviceId, np.ndarray]
    ) -> tuple[list[DeviceId], list[DeviceId]]:
        """Stage 2 replies -> (survivors U3, dropouts U2 \\ U3): the unmask request."""
        self._masked = {i: np.asarray(y, np.uint64) for i, y in masked.items() if i in self._u2}
        if len(self._masked) < self.config.min_survivors:
            raise SecAggAbort(f"{len(self._masked)} masked inputs, fewer than K_min")
        for y in self._masked.values():
            if y.shape != (self.config.length,):
                raise SecAggAbort("a masked input has the wrong shape")
        self.survivors = sorted(self._masked)
        self.dropouts = sorted(self._u2 - set(self._masked))
        return self.survivors, self.dropouts

    def _rebuild(self, owner: DeviceId, kind: str, responses: Mapping[DeviceId, Mapping]) -> bytes:
        shares = [r[kind][owner] for r in responses.values() if owner in r[kind]]
        if len(shares) < self.config.threshold:
            raise SecAggAbort(f"{len(shares)} shares of device {owner}'s {kind}, t is larger")
        try:
            return shamir.combine(shares[: self.config.threshold])
        except ValueError as err:
            raise SecAggAbort(f"device {owner}'s {kind} shares do not combine: {err}") from err

    def unmask(
        self, responses: Mapping[DeviceId, Mapping[str, Mapping[DeviceId, bytes]]]
    ) -> np.ndarray:
        """Stage 3 replies -> Σ_{survivors} x_i mod 2^b (uint64)."""
        cfg = self.config
        responses = {i: r for i, r in responses.items() if i in self._masked}
        total = _MaskSum(np.zeros(cfg.length, np.uint64))
        for i in self.survivors:
            total.add(self._masked[i], 1)
            total.add(_keystream(self._rebuild(i, "seed_shares", responses), cfg.length), -1)
        for j in self.dropouts:
            secret = X25519PrivateKey.from_private_bytes(self._rebuild(j, "sk_shares", responses))
            for i in sorted(self._graph[j] & set(self.survivors)):
                # i masked with j (both in U2): remove i's term ±PRG(s_ij)
                seed = _pair_seed(secret, self._roster[i]["pk_s"])
                total.add(_keystream(seed, cfg.length), -_pair_sign(i, j))
        return total.residues(cfg.bits)
