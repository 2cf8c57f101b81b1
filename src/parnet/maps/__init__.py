"""Parallel maps: the shared chunk machinery (``common``), the local process pool (``pool``)
and the local maps ``parcellfun`` / ``pararrayfun`` (``localmap``).

The network maps (``netmap``) build on ``common`` and, on each server, on ``pool``.
"""

from parnet.maps.localmap import pararrayfun, parcellfun

__all__ = ["parcellfun", "pararrayfun"]
