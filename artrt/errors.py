"""Every exception artrt raises on purpose. Library code raises these; only the CLI (and the
server) turn them into one line and an exit code or status.

:class:`ArtrtError` and its subclasses are errors a user can cause or act on: bad input, a
broken package, a missing backend. Bugs are not ``ArtrtError``: they raise Python's own
exceptions and show a traceback.
"""


class ArtrtError(Exception):
    """Base class of every error a user can cause or act on."""


class PackageError(ArtrtError):
    """A package directory is missing, corrupt, or its manifest is invalid."""


class StaleEngineError(PackageError):
    """A built engine is missing or does not fit this system, package or request."""


class ConfigError(ArtrtError):
    """A model or scheduler configuration uses a setting artrt does not support."""


class InputError(ArtrtError):
    """A generation argument is out of range (size, steps, switch, sampler, ...)."""


class Cancelled(ArtrtError):
    """A generation stopped early because its caller cancelled it (its ``cancel`` event was set)."""


class OutputError(ArtrtError):
    """A file could not be written (missing or read-only folder, full disk, ...)."""


class EngineError(ArtrtError):
    """A backend failed to load or run a component."""


class GraphCaptureError(EngineError):
    """A backend cannot capture this graph into a CUDA graph (it may still run it uncaptured)."""


class ExportError(ArtrtError):
    """A graph failed to export, or its ONNX output disagrees with PyTorch."""


class CpuOptimizeError(ArtrtError):
    """The CPU-fused graph changed the interface or disagrees with the original graph."""


class OptimizeError(ArtrtError):
    """The ONNX Runtime transformers optimizer failed or changed the graph's interface."""


class BuildError(ArtrtError):
    """An engine could not be built (TensorRT missing, parser or builder failure)."""
