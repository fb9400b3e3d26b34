"""Reference statistics cached on disk, keyed by everything that produced them.

A key is a JSON object (model fingerprint, feature extractor identity, data source, sample count,
seed, solver, …); its SHA-256 names the file, and the key itself is stored beside the arrays so a
cache entry explains itself. Writes are atomic: a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .distances import GaussianStats


def default_cache_dir() -> Path:
    """$SOLVERSEARCH_CACHE, else $XDG_CACHE_HOME/solversearch, else ~/.cache/solversearch."""
    if os.environ.get("SOLVERSEARCH_CACHE"):
        return Path(os.environ["SOLVERSEARCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "solversearch"


@dataclass(frozen=True)
class ReferenceFeatures:
    """Gaussian statistics of the reference features, and the features themselves (for KID)."""

    stats: GaussianStats
    features: np.ndarray | None


class ArrayCache:
    """Named float64 arrays on disk under a key; `get_or_compute` computes and stores on a miss."""

    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def path_for(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.directory / f"{key.get('kind', 'entry')}-{digest}.npz"

    def get_or_compute(self, key: Mapping[str, Any], compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        path = self.path_for(key)
        if path.exists():
            try:
                with np.load(path) as stored:
                    return {name: stored[name] for name in stored.files if name != "_key"}
            except (OSError, ValueError):
                pass  # unreadable entry (e.g. truncated by a full disk): recompute it
        arrays = compute()
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, _key=np.array(json.dumps(key, sort_keys=True, default=str)), **arrays)
        tmp.replace(path)
        return arrays


def reference_features(
    cache: ArrayCache, key: Mapping[str, Any], compute_features: Callable[[], np.ndarray], keep_features: int = 5000
) -> ReferenceFeatures:
    """Statistics of the features `compute_features` returns, cached under `key` (kind "reference")."""

    def compute() -> dict[str, np.ndarray]:
        features = np.asarray(compute_features(), dtype=np.float64)
        stats = GaussianStats.of(features)
        return {"mean": stats.mean, "cov": stats.cov, "n": np.array(stats.n), "features": features[:keep_features]}

    arrays = cache.get_or_compute({"kind": "reference", **key}, compute)
    stats = GaussianStats(mean=arrays["mean"], cov=arrays["cov"], n=int(arrays["n"]))
    return ReferenceFeatures(stats=stats, features=arrays.get("features"))
