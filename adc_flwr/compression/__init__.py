"""Split-point compressors behind one interface (DESIGN.md section 2)."""

from adc_flwr.compression import adc, none  # noqa: F401  (register the methods)
from adc_flwr.compression.base import Compressor, Packet
from adc_flwr.compression.registry import available_methods, build_compressor, register

__all__ = ["Compressor", "Packet", "available_methods", "build_compressor", "register"]
