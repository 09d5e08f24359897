"""Export side (needs the ``export`` extra): diffusers folders -> ONNX package."""

from .package_export import export_package
from .sources import ModelSources, load_same_arch, load_sdxl_ensemble

__all__ = ["ModelSources", "export_package", "load_same_arch", "load_sdxl_ensemble"]
