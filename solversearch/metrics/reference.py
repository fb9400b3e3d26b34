"""Reference statistics cached on disk, keyed by everything that produced them.

A key is a JSON object (model fingerprint, feature extractor identity, data source, sample count,
seed, solver, …); its SHA-256 names the file, and the key itself is stored beside the arrays so a
cache entry explains itself. Writes are atomic: a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import atomic_output
from .distances import GaussianStats


def default_cache_dir() -> Path:
    """$SOLVERSEARCH_CACHE, else $XDG_CACHE_HOME/solversearch, else ~/.cache/solversearch."""
    if os.environ.get("SOLVERSEARCH_CACHE"):
        return Path(os.environ["SOLVERSEARCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "solversearch"


@dataclass(frozen=True)
class ReferenceFeatures:
    """Gaussian statistics of the reference features, the features themselves (for KID; None for
    precomputed statistics) and what they are of, for reports (e.g. "real data: 1,797 images")."""

    stats: GaussianStats
    features: np.ndarray | None
    description: str = ""


class ArrayCache:
    """Named float64 arrays on disk under a key; `get_or_compute` computes and stores on a miss.

    Every build is logged as one JSON line in `builds.jsonl` (kind, file, process, seconds): what a first
    run spent its time on, and the proof that workers read what the driver built instead of building it."""

    BUILD_LOG = "builds.jsonl"

    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def path_for(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.directory / f"{key.get('kind', 'entry')}-{digest}.npz"

    def get_or_compute(
        self, key: Mapping[str, Any], compute: Callable[[], dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        path = self.path_for(key)
        if path.exists():
            try:
                with np.load(path) as stored:
                    return {name: stored[name] for name in stored.files if name != "_key"}
            except (OSError, ValueError):
                pass  # unreadable entry (e.g. truncated by a full disk): recompute it
        started = time.perf_counter()
        arrays = compute()
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            np.savez(tmp, _key=np.array(json.dumps(key, sort_keys=True, default=str)), **arrays)
        entry = {
            "kind": key.get("kind", "entry"),
            "file": path.name,
            "pid": os.getpid(),
            "seconds": round(time.perf_counter() - started, 3),
        }
        with open(self.directory / self.BUILD_LOG, "a") as log:  # one short line per build: appends don't interleave
            log.write(json.dumps(entry) + "\n")
        return arrays

    def builds(self) -> list[dict[str, Any]]:
        """Every build logged in this cache directory, oldest first."""
        path = self.directory / self.BUILD_LOG
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def reference_features(
    cache: ArrayCache,
    key: Mapping[str, Any],
    compute_features: Callable[[], np.ndarray],
    keep_features: int = 5000,
    description: str = "",
) -> ReferenceFeatures:
    """Statistics of the features `compute_features` returns, cached under `key` (kind "reference")."""

    def compute() -> dict[str, np.ndarray]:
        features = np.asarray(compute_features(), dtype=np.float64)
        stats = GaussianStats.of(features)
        return {"mean": stats.mean, "cov": stats.cov, "n": np.array(stats.n), "features": features[:keep_features]}

    arrays = cache.get_or_compute({"kind": "reference", **key}, compute)
    stats = GaussianStats(mean=arrays["mean"], cov=arrays["cov"], n=int(arrays["n"]))
    return ReferenceFeatures(stats=stats, features=arrays.get("features"), description=description)
