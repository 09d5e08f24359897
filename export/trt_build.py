"""The TensorRT calls of ``artrt build``: one ONNX file -> one serialized plan.

``tensorrt`` is imported lazily and only here; what to build (profiles, records, which
components) is planned in :mod:`.build` and testable without it. Written for TensorRT
10 and 11: networks are strongly typed (TensorRT 11 has no weak typing), so precision
comes from the fp16 ONNX graph, never from ``BuilderFlag.FP16``. Every status TensorRT
returns is checked, and failures name the component, tensor and value.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from artrt.errors import BuildError
from artrt.files import write_atomic

log = logging.getLogger(__name__)

Shape = tuple[int, ...]



def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or one clear :class:`BuildError` when it cannot be used."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildError(
            f"TensorRT is not installed ({exc}); install it on a machine with an NVIDIA GPU "
            "(pip install tensorrt) or build for --backend ort-cuda"
        ) from None
    if not hasattr(trt, "Builder"):  # e.g. only the 'tensorrt-stubs' .pyi files
        raise BuildError(
            "TensorRT is not installed (the 'tensorrt' found has no Builder: only type stubs?); install it on "
            "a machine with an NVIDIA GPU (pip install tensorrt) or build for --backend ort-cuda"
        )
    return trt


def tensorrt_version() -> str:
    return str(import_tensorrt().__version__)


def build_plan(
    onnx: Path, dst: Path, profile: Mapping[str, tuple[Shape, Shape, Shape]], opt_level: int = 3,
    timing_cache: Path | None = None, name: str = "", refittable: bool = False,
) -> None:
    """Parse ``onnx`` into a strongly typed network, build it for one optimization profile
    (input -> (min, opt, max)) and write the plan to ``dst`` atomically. The timing cache
    file, when given, is read first and updated after a successful build. ``refittable``:
    every weight may be replaced later (``BuilderFlag.REFIT``; LoRA refits them by their
    ONNX initializer names, ``engines.trt.TrtEngine.set_weights``)."""
    trt = import_tensorrt()
    name = name or onnx.stem
    logger = _logger(trt, name)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        raise BuildError(f"{name}: TensorRT cannot parse {onnx}: {parser_errors(parser)}")
    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    _add_profile(builder, config, network, profile, name)
    monitor = _progress_monitor(trt, name)  # must outlive the build
    if monitor is not None:
        config.progress_monitor = monitor
    cache = _load_timing_cache(config, timing_cache)
    if not config.set_timing_cache(cache, False):
        log.warning("%s: TensorRT did not accept the timing cache %s; building without it", name, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        detail = logger.errors[-1] if logger.errors else "see the TensorRT messages above"
        raise BuildError(f"{name}: TensorRT failed to build an engine from {onnx.name}: {detail}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dst, memoryview(plan))
    if timing_cache is not None:
        save_timing_cache(config, timing_cache)


def plan_refittable(plan: Path) -> bool:
    """Whether the TensorRT plan at ``plan`` was built refittable (False when this TensorRT cannot load it)."""
    trt = import_tensorrt()
    runtime = trt.Runtime(_logger(trt, plan.stem))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    return engine is not None and bool(engine.refittable)


def parser_errors(parser: Any) -> str:
    """Every error of an ``OnnxParser``, with the ONNX node's index, name and operator."""
    problems = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node_name = error.node_name() if hasattr(error, "node_name") else ""
        operator = error.node_operator() if hasattr(error, "node_operator") else ""
        problems.append(f"node {error.node()} {node_name!r} ({operator}): {error.desc()}")
    return "; ".join(problems) or "no error reported by the parser"


def save_timing_cache(config: Any, path: Path) -> None:
    """Merge this build's timing cache into the file at ``path`` (others may have added to it)."""
    cache = config.get_timing_cache()
    if path.is_file():
        try:
            on_disk = config.create_timing_cache(path.read_bytes())
            if on_disk.combine(cache, False):
                cache = on_disk
        except Exception as exc:  # a corrupt cache is replaced, never fatal
            log.warning("replacing unreadable timing cache %s (%s)", path, exc)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, memoryview(cache.serialize()))


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        return config.create_timing_cache(data)
    except Exception as exc:
        log.warning("ignoring unreadable timing cache %s (%s)", path, exc)
        return config.create_timing_cache(b"")


def _network_flags(trt: Any) -> int:
    """STRONGLY_TYPED where the flag exists (TensorRT 10); TensorRT 11 networks always are."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _add_profile(builder: Any, config: Any, network: Any, profile: Mapping, name: str) -> None:
    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = tuple(int(d) for d in tensor.shape)
    missing, unknown = sorted(set(inputs) - set(profile)), sorted(set(profile) - set(inputs))
    if missing or unknown:
        raise BuildError(f"{name}: profile does not match the network inputs (missing {missing}, unknown {unknown})")
    optimization_profile = builder.create_optimization_profile()
    for tensor, (low, opt, high) in profile.items():
        dims = inputs[tensor]
        fits = len(dims) == len(low) == len(opt) == len(high) and all(
            d < 0 or lo == o == hi == d for d, lo, o, hi in zip(dims, low, opt, high)
        )
        if not fits:
            raise BuildError(f"{name}: input {tensor} is {list(dims)} in the network; profile "
                             f"{list(low)} / {list(opt)} / {list(high)} does not fit it")
        try:
            optimization_profile.set_shape(tensor, tuple(low), tuple(opt), tuple(high))
        except (TypeError, ValueError) as exc:
            raise BuildError(f"{name}: TensorRT rejected the profile of {tensor} "
                             f"({list(low)} / {list(opt)} / {list(high)}): {exc}") from None
    if config.add_optimization_profile(optimization_profile) < 0:
        raise BuildError(f"{name}: TensorRT rejected the optimization profile {dict(profile)}")


def _logger(trt: Any, name: str) -> Any:
    """A TensorRT logger forwarding to :mod:`logging` and keeping the error messages."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= 1:
                self.errors.append(msg)
                log.error("%s: TensorRT: %s", name, msg)
            elif level == 2:
                log.warning("%s: TensorRT: %s", name, msg)
            elif level == 3:
                log.debug("%s: TensorRT: %s", name, msg)

    return Logger()


def _progress_monitor(trt: Any, name: str) -> Any:
    """Logs the builder's top-level phases (None where TensorRT has no progress monitor)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                log.info("%s: %s (%d steps)", name, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Progress()
