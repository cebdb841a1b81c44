"""The public catalogue a device builds its model from, in one file.

A deployed device needs the item catalogue (ids, texts, years), the frozen text features of the
items and the span of the run's timeline (the model's time knots), and nothing else: no
dataset, no one's interactions. The server writes this file (`fedrec server start` writes
`<out>/public-catalogue.npz`; `fedrec server catalogue` writes it before a run) and it is copied
to devices like `ca.pem`. Its digest travels with the run, so a device whose copy differs
from the server's declines the round instead of training a different model.

Everything in it is public: item metadata, features computed from item texts by a public
encoder, and two timestamps that bound the run's timeline (the same for every device).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.common.data.schema import Catalogue

FORMAT = "fedrec-public-catalogue/1"
_KEYS = ("format", "item_ids", "titles", "genres", "years", "text_features", "time_range")


class PublicCatalogueError(ValueError):
    """A public catalogue file that cannot be read or does not hold a valid catalogue."""


@dataclass(frozen=True)
class PublicCatalogue:
    catalogue: Catalogue
    text_features: np.ndarray  # (I, D) float32
    time_range: tuple[int, int]  # the run's timeline: the model's time knots span it

    @property
    def digest(self) -> str:
        """sha256 of everything the model is built from (the file's content, not its bytes)."""
        h = hashlib.sha256(FORMAT.encode())
        for text in (*map(str, self.catalogue.item_ids), *self.catalogue.texts()):
            h.update(text.encode("utf-8") + b"\x00")
        h.update(np.ascontiguousarray(self.catalogue.years, dtype=np.int32).tobytes())
        h.update(np.ascontiguousarray(self.text_features, dtype=np.float32).tobytes())
        h.update(np.asarray(self.time_range, dtype=np.int64).tobytes())
        return h.hexdigest()

    def item_index(self) -> dict[str, int]:
        return {str(item): i for i, item in enumerate(self.catalogue.item_ids)}


def write_public_catalogue(path: Path, public: PublicCatalogue) -> None:
    from fedrec.common.io import atomic_write

    c = public.catalogue
    arrays = {
        "format": np.array(FORMAT),
        "item_ids": np.array([str(i) for i in c.item_ids]),
        "titles": np.array(c.titles, dtype=str),
        "genres": np.array(c.genres, dtype=str),
        "years": np.asarray(c.years, dtype=np.int32),
        "text_features": np.asarray(public.text_features, dtype=np.float32),
        "time_range": np.asarray(public.time_range, dtype=np.int64),
    }
    atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def read_public_catalogue(path: Path) -> PublicCatalogue:
    """The catalogue in `path`; PublicCatalogueError names what is wrong with a bad file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            missing = [k for k in _KEYS if k not in data.files]
            if missing:
                raise PublicCatalogueError(f"{path}: not a public catalogue (missing {missing})")
            values = {k: data[k] for k in _KEYS}
    except PublicCatalogueError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise PublicCatalogueError(f"{path}: unreadable public catalogue: {err}") from err
    if str(values["format"]) != FORMAT:
        raise PublicCatalogueError(f"{path}: format {str(values['format'])!r}, expected {FORMAT}")
    n = len(values["item_ids"])
    features, span = values["text_features"], values["time_range"]
    if features.ndim != 2 or features.shape[0] != n or not np.isfinite(features).all():
        raise PublicCatalogueError(
            f"{path}: text_features must be ({n}, D) finite values, got {features.shape}"
        )
    if span.shape != (2,) or span[1] < span[0]:
        raise PublicCatalogueError(f"{path}: time_range must be [start, end], got {span}")
    try:
        catalogue = Catalogue(
            values["item_ids"],
            tuple(str(t) for t in values["titles"]),
            tuple(str(g) for g in values["genres"]),
            np.asarray(values["years"], dtype=np.int32),
        )
    except ValueError as err:
        raise PublicCatalogueError(f"{path}: {err}") from err
    return PublicCatalogue(catalogue, features.astype(np.float32), (int(span[0]), int(span[1])))
