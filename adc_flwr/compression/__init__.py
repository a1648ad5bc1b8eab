"""Split-point compressors behind one interface (docs/design.md section 2).

Every module of this package other than ``base`` and ``registry`` is a method that
registers itself on import; importing the package imports them all.
"""

import importlib
import pkgutil

from adc_flwr.compression.base import Compressor, Packet
from adc_flwr.compression.registry import (
    available_methods,
    build_compressor,
    get_compressor_class,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Compressor",
    "Packet",
    "available_methods",
    "build_compressor",
    "get_compressor_class",
    "register",
]
