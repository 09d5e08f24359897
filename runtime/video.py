"""Video packages (the Wan family): frame counts, the causal VAE decode, animated WebP output.

The Wan VAE decodes one latent frame per call with its feature cache as explicit inputs and
outputs (docs/wan-design.md, part 3): ``vae_decoder`` (``decoder_first``) turns latent frame 0
into video frame 0 and every cache; ``vae_decoder_chunk`` turns each later latent frame and the
previous caches into 4 video frames and the next caches. Any frame count works; one frame
(text-to-image) needs the first graph alone.
"""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from artrt.errors import InputError
from artrt.files import write_atomic

from .package import Manifest

WAN_FAMILY = "wan"
CHUNK_DECODER = "vae_decoder_chunk"  # the component decoding latent frames after the first
LATENTS, VIDEO = "latents", "video"  # the decoder graphs' latent input and video output
FRAMES_PER_CHUNK = 4  # video frames per latent frame after the first (the VAE's temporal factor)
MAX_FRAMES = 1 + FRAMES_PER_CHUNK * 256
FPS = 16  # WanPipeline's export_to_video default

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def is_flow(m: Manifest) -> bool:
    """Whether the package's experts are flow-matching transformers (the Wan family)."""
    return m.family == WAN_FAMILY


def makes_video(m: Manifest) -> bool:
    """Whether the package can decode more than one frame."""
    return is_flow(m) and CHUNK_DECODER in m.components


def cache_name(k: int) -> str:
    """Name of cache ``k`` as an input of the chunk decoder."""
    return f"cache_{k:02d}"


def next_cache_name(k: int) -> str:
    """Name of cache ``k`` as an output of both decoder graphs."""
    return f"next_cache_{k:02d}"


def latent_frames(num_frames: int) -> int:
    """Latent frames of a video of ``num_frames`` (= 4k + 1) frames."""
    return (num_frames - 1) // FRAMES_PER_CHUNK + 1


def decode_frames(run_first: Runner, run_chunk: Runner | None, latents: np.ndarray) -> np.ndarray:
    """Decode sampler latents ``[B, 16, F, h, w]`` into a video ``[B, 3, 1 + 4(F − 1), 8h, 8w]`` in
    [-1, 1], one latent frame per call: ``run_first`` on frame 0, then ``run_chunk`` on each later
    frame with the previous call's ``next_cache_k`` as ``cache_k``.

    The runners take named inputs and return named outputs (``Engine.run``). This is what
    ``WanPipeline`` gets from ``vae.decode`` after its de-normalisation (in the graphs), before
    ``postprocess_video`` (:func:`to_frames`)."""
    latents = np.asarray(latents)
    if latents.ndim != 5 or latents.shape[2] < 1:
        raise ValueError(f"latents must be [B, C, F >= 1, h, w], got {latents.shape}")
    if latents.shape[2] > 1 and run_chunk is None:
        raise ValueError("more than one latent frame needs the chunk decoder")
    out = run_first({LATENTS: np.ascontiguousarray(latents[:, :, :1])})
    frames = [out[VIDEO]]
    n = sum(1 for name in out if name.startswith("next_cache_"))
    caches = [out[next_cache_name(k)] for k in range(n)]
    for f in range(1, latents.shape[2]):
        feeds = {LATENTS: np.ascontiguousarray(latents[:, :, f:f + 1])}
        feeds.update({cache_name(k): caches[k] for k in range(n)})
        out = run_chunk(feeds)  # type: ignore[misc]
        frames.append(out[VIDEO])
        caches = [out[next_cache_name(k)] for k in range(n)]
    return np.concatenate(frames, axis=2)


def to_frames(video: np.ndarray) -> list[list[Image.Image]]:
    """``[B, 3, T, H, W]`` in [-1, 1] to one list of RGB frames per video (WanPipeline's
    ``postprocess_video``: ``video / 2 + 0.5`` clamped to [0, 1], then 8 bits)."""
    video = np.clip(video / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 4, 1)
    return [[Image.fromarray(np.round(frame * 255).astype(np.uint8)) for frame in clip] for clip in video]


XMP_NAMESPACE = "https://artrt.dev/ns/1.0/"  # the namespace of artrt:parameters in a video's XMP packet


def xmp_packet(parameters: Mapping[str, Any]) -> bytes:
    """An XMP packet (RDF/XML) holding ``parameters`` as JSON text in ``artrt:parameters``, which
    XMP readers (exiftool, Pillow's ``getxmp``) list as one property."""
    x, rdf = "adobe:ns:meta/", "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
    ET.register_namespace("x", x)
    ET.register_namespace("rdf", rdf)
    ET.register_namespace("artrt", XMP_NAMESPACE)
    meta = ET.Element(f"{{{x}}}xmpmeta")
    description = ET.SubElement(ET.SubElement(meta, f"{{{rdf}}}RDF"), f"{{{rdf}}}Description", {f"{{{rdf}}}about": ""})
    ET.SubElement(description, f"{{{XMP_NAMESPACE}}}parameters").text = json.dumps(dict(parameters), sort_keys=True)
    return ET.tostring(meta, encoding="utf-8")


def encode_webp(frames: Sequence[Image.Image], parameters: Mapping[str, Any], fps: int = FPS) -> bytes:
    """Animated, lossless WebP bytes of ``frames`` with ``parameters`` in its XMP chunk (:func:`xmp_packet`)."""
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=list(frames[1:]), lossless=True,
                   duration=round(1000 / fps), loop=0, xmp=xmp_packet(parameters))
    return buffer.getvalue()


def save_webp(frames: Sequence[Image.Image], path: str | Path, parameters: Mapping[str, Any]) -> Path:
    """Write ``frames`` as an animated WebP with the parameters (atomically: temporary file + rename)."""
    path = Path(path)
    if path.suffix.lower() != ".webp":
        raise InputError(f"videos are written as animated WebP: output {path} must end in .webp")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
    return write_atomic(path, encode_webp(frames, parameters))


def read_webp_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters stored by :func:`save_webp`."""
    with Image.open(path) as image:
        xmp = image.info.get("xmp")
    if not xmp:
        raise InputError(f"{path} holds no artrt parameters (no XMP chunk)")
    if xmp.lstrip().startswith(b"{"):  # written by artrt before the XMP packet: bare JSON
        return json.loads(xmp)
    node = ET.fromstring(xmp).find(f".//{{{XMP_NAMESPACE}}}parameters")
    if node is None or not node.text:
        raise InputError(f"{path} holds no artrt parameters in its XMP packet")
    return json.loads(node.text)
