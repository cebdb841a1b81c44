"""Text features of the catalogue: encoders and the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest

import fedrec.common.text as text_module
from fedrec.common.data.schema import Catalogue
from fedrec.common.text import item_text_features


def catalogue(titles) -> Catalogue:
    return Catalogue(
        item_ids=np.array([str(i) for i in range(len(titles))]),
        titles=tuple(titles),
        genres=tuple("Drama" for _ in titles),
    )


def test_hashing_features_are_unit_vectors(tmp_path):
    features = item_text_features(catalogue(["a b", "c d", "a b c"]), "hashing", tmp_path)
    assert features.shape == (3, 384) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)


def test_cache_is_reused_and_keyed_by_catalogue_text(tmp_path, monkeypatch):
    cat = catalogue(["Heat (1995)", "Alien (1979)"])
    first = item_text_features(cat, "hashing", tmp_path)
    files = list((tmp_path / "text").iterdir())
    assert len(files) == 1

    def no_encoding(name):
        raise AssertionError("a cached catalogue must not be encoded again")

    monkeypatch.setattr(text_module, "make_encoder", no_encoding)
    np.testing.assert_array_equal(item_text_features(cat, "hashing", tmp_path), first)
    with pytest.raises(AssertionError, match="must not be encoded"):
        item_text_features(catalogue(["Heat (1995)", "Aliens (1986)"]), "hashing", tmp_path)


def test_unknown_encoder_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown text encoder"):
        item_text_features(catalogue(["x"]), "word2vec", tmp_path)


def test_minilm_loads_offline_and_places_similar_titles_closer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cat = Catalogue(
        item_ids=np.array(["a", "b", "c"]),
        titles=(
            "Star Wars: A New Hope (1977)",
            "Star Wars: The Empire Strikes Back (1980)",
            "Notting Hill (1999)",
        ),
        genres=("Sci-Fi|Adventure", "Sci-Fi|Adventure", "Romance|Comedy"),
    )
    v = item_text_features(cat, "minilm", tmp_path)
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
