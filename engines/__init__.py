"""Backends that run one exported component: ``trt``, ``ort-cuda`` and ``ort-cpu``.

Each backend module imports its library lazily, so this package imports with only
numpy and onnxruntime installed.
"""

from __future__ import annotations

from pathlib import Path

from artrt.errors import InputError

from .base import Engine, TensorSpec

BACKENDS = ("trt", "ort-cuda", "ort-cpu")  # fastest first


def backend_problems() -> dict[str, str | None]:
    """For each backend, None when it can run here, else why not (checked without loading models)."""
    from .cuda import gpu_available

    gpu = None if gpu_available() else "no CUDA GPU (or driver, or cuda-python) found"
    problems: dict[str, str | None] = {"ort-cpu": None}
    from .trt import tensorrt_installed

    if not tensorrt_installed():
        problems["trt"] = "TensorRT is not installed"
    else:
        problems["trt"] = gpu
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        problems["ort-cuda"] = "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    else:
        problems["ort-cuda"] = gpu
    return problems


def resolve_backend(name: str, candidates: tuple[str, ...] = BACKENDS) -> str:
    """Check a backend name; ``auto`` picks the first of ``candidates`` that can run here."""
    if name != "auto" and name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    if name == "ort-cpu":
        return name
    problems = backend_problems()
    if name == "auto":
        return next(b for b in (*candidates, "ort-cpu") if problems[b] is None)
    if problems[name] is not None:
        raise InputError(f"backend {name} cannot run here: {problems[name]}")
    return name


def create_engine(backend: str, path: str | Path, name: str | None = None, **options: object) -> Engine:
    """Create (not yet activate) the engine for one component file on a resolved backend."""
    if backend == "trt":
        from .trt import TrtEngine as cls
    elif backend == "ort-cuda":
        from .ort_cuda import OrtCudaEngine as cls
    elif backend == "ort-cpu":
        from .ort import OrtCpuEngine as cls
    else:
        raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return cls(path, name=name, **options)  # type: ignore[arg-type]


__all__ = ["BACKENDS", "Engine", "TensorSpec", "backend_problems", "create_engine", "resolve_backend"]
