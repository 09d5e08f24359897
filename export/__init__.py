"""Export side (needs the ``export`` extra): diffusers folders -> ONNX package, engine builds.

Names are imported on first use, so ``artrt.export.build`` (TensorRT / ORT builds from a
package) does not pull in torch.
"""

import logging
from typing import Any

# diffusers warns at import when two installed distributions provide one module; the export extra
# installs optimum and optimum-onnx, which both provide "optimum": noise on every export
logging.getLogger("diffusers.utils.import_utils").addFilter(
    lambda record: "Multiple distributions found for package optimum" not in record.getMessage())

__all__ = ["ModelSources", "check_output_dir", "export_package", "load_same_arch", "load_sdxl_ensemble"]


def __getattr__(name: str) -> Any:
    if name in ("export_package", "check_output_dir"):
        from . import package_export

        return getattr(package_export, name)
    if name in ("ModelSources", "load_same_arch", "load_sdxl_ensemble"):
        from . import sources

        return getattr(sources, name)
    raise AttributeError(f"module 'artrt.export' has no attribute {name!r}")
