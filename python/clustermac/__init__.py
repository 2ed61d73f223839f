"""clustermac: particular-object image retrieval with ClusterMAC and its baselines.

ClusterMAC (Chen, Wong, Kuang, Zhang, 2017) max-pools CNN activations over clusters found
by Normalized Cut instead of over R-MAC's fixed square grid.
"""
from __future__ import annotations

from . import _core

__version__ = "0.1.0"

__all__ = ["__version__"]
