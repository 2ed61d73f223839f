"""The one registry of descriptor methods: name -> class. A new method is a class and a line here."""

from __future__ import annotations

from .base import DescriptorMethod
from .clustermac import ClusterMAC
from .clustermac_box import ClusterMACBox
from .global_pooling import MAC, CroW, GeM, SPoC
from .rmac import RMAC

__all__ = ["DEFAULT_METHOD", "METHOD_CLASSES", "METHODS", "REGIONAL_METHODS", "method_class"]

METHOD_CLASSES: dict[str, type[DescriptorMethod]] = {
    "mac": MAC,
    "spoc": SPoC,
    "gem": GeM,
    "crow": CroW,
    "rmac": RMAC,
    "clustermac": ClusterMAC,
    "clustermac-box": ClusterMACBox,
}
#: The method of ``Extractor()`` and of the command line without ``--method``: the best descriptor
#: measured (issue 16; the README's "Beyond the paper"). The paper's ClusterMAC is ``"clustermac"``.
DEFAULT_METHOD = "clustermac-box"
#: Every method's name, in the registry's order.
METHODS = tuple(METHOD_CLASSES)
#: The methods that aggregate regional vectors (the others pool one global vector).
REGIONAL_METHODS = tuple(name for name, cls in METHOD_CLASSES.items() if cls.regional)


def method_class(name: str) -> type[DescriptorMethod]:
    """The class of method ``name``; ValueError naming the choices for an unknown one."""
    try:
        return METHOD_CLASSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"method: expected one of {METHODS}, got {name!r}") from None
