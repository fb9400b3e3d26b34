"""Metrics: feature extractors, Fréchet distance, KID, error to reference, reference statistics cache."""

from .distances import GaussianStats, error_to_reference, frechet_distance, kernel_inception_distance

__all__ = ["GaussianStats", "error_to_reference", "frechet_distance", "kernel_inception_distance"]
