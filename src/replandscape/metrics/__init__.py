"""Geometry metrics of representations: pure functions, numpy in, typed results out.

``neighbors`` holds the exact nearest-neighbour engine, ``geometry`` the estimators (computed by
DADApy on those neighbours) and their result type. Importing this package does not import DADApy.
"""

from __future__ import annotations

from replandscape.metrics.geometry import GeometryParams, GeometryResult, compute_geometry
from replandscape.metrics.neighbors import deduplicate, exact_knn

__all__ = ["GeometryParams", "GeometryResult", "compute_geometry", "deduplicate", "exact_knn"]
