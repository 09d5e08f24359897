"""The Wan VAE decoder as two ONNX graphs with explicit caches (issue 16, docs/wan-design.md part 3).

The proofs, against diffusers' ``AutoencoderKLWan.decode`` of the tiny random ``WanPipeline``
folder: the export-friendly upsampler is bit for bit diffusers'; ``decode_frames`` over the ONNX
graphs (ONNX Runtime, CPU) gives ``vae.decode``'s video for 1, 2, 3 and 5 latent frames, at a
non-square size, other sizes and batch 2, from graphs traced once; the same loop without the
carried cache misses; and ``WanPipeline``'s own video comes out of the sampler's latents this way.
Export extra only; about 15 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from artrt.export.onnx_io import tensor_info
from artrt.export.wan_models import SIZES, write_wan_pair
from artrt.export.wan_vae import (
    CHUNK,
    FIRST,
    LATENTS,
    VIDEO,
    ExportAttentionBlock,
    NearestUpsample2x,
    WanDecoderChunk,
    WanDecoderFirst,
    cache_name,
    cache_specs,
    decode_frames,
    export_wan_decoder,
    next_cache_name,
    ort_runner,
    prepare_vae,
    replace_upsamplers,
)

TINY = SIZES["tiny"]
HEIGHT, WIDTH = TINY.defaults["height"], TINY.defaults["width"]  # 32 x 48 pixels: 4 x 6 latents
LATENT_HW = (HEIGHT // 8, WIDTH // 8)
BOUND = 1e-4  # max abs error of the chunked ONNX decode vs vae.decode (video in [-1, 1])
# The TI2V-5B layout (residual decoder, 2x2 patches, 16x spatial), at a tiny width.
RESIDUAL = dict(base_dim=4, decoder_base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                out_channels=12, scale_factor_spatial=16)


def load_vae(folder: Path):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(folder / "vae", local_files_only=True).eval()


def pipeline_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """What ``WanPipeline`` hands ``vae.decode``: its de-normalisation of the sampler's latents."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
    return latents / std + mean


def diffusers_decode(vae, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return vae.decode(pipeline_latents(vae, latents), return_dict=False)[0].numpy()


def torch_runner(module):
    """A decode_frames runner over a torch graph module (inputs in the graph's order)."""
    def run(feeds):
        n = len(feeds) - 1
        args = [torch.from_numpy(feeds[LATENTS])] + [torch.from_numpy(feeds[cache_name(k)]) for k in range(n)]
        with torch.no_grad():
            video, *caches = module(*args)
        return {VIDEO: video.numpy()} | {next_cache_name(k): c.numpy() for k, c in enumerate(caches)}

    return run


def random_latents(batch: int, frames: int, hw: tuple[int, int], seed: int = 0, channels: int = 16) -> torch.Tensor:
    return torch.randn(batch, channels, frames, *hw, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return write_wan_pair(tmp_path_factory.mktemp("wan-vae") / "pair", size="tiny", seed=0)


@pytest.fixture(scope="module")
def vae(wan_dir):
    """diffusers' own modules (never prepared): the reference."""
    return load_vae(wan_dir)


@pytest.fixture(scope="module")
def exported(wan_dir, tmp_path_factory):
    """Both graphs from a second copy of the weights (prepared in place), with ORT runners."""
    info = export_wan_decoder(load_vae(wan_dir), tmp_path_factory.mktemp("wan-vae-onnx"))
    info["run"] = {name: ort_runner(path) for name, path in info["paths"].items()}
    return info


def onnx_decode(exported, latents: torch.Tensor) -> np.ndarray:
    return decode_frames(exported["run"][FIRST], exported["run"][CHUNK], latents.numpy())


# --- the upsampler swap ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (3, 4, 6, 9)])
def test_nearest_upsample_is_nearest_exact_at_scale_2(dtype, shape):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = WanUpsample(scale_factor=(2.0, 2.0), mode="nearest-exact")(x)
    got = NearestUpsample2x()(x)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_other_upsamplers_are_refused():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample

    with pytest.raises(NotImplementedError, match="scale_factor"):
        replace_upsamplers(torch.nn.Sequential(WanUpsample(scale_factor=(3.0, 3.0), mode="nearest-exact")))


def test_prepared_vae_decodes_bit_for_bit(wan_dir, vae):
    """Both swaps (upsamplers, attention block) keep diffusers' values exactly."""
    prepared = prepare_vae(load_vae(wan_dir))
    names = {type(m).__name__ for m in prepared.modules()}
    assert "WanUpsample" not in names and "WanAttentionBlock" not in names
    assert sum(isinstance(m, NearestUpsample2x) for m in prepared.modules()) == 3  # 2 upsample3d, 1 upsample2d
    assert sum(isinstance(m, ExportAttentionBlock) for m in prepared.decoder.modules()) == 1  # the mid block's
    latents = random_latents(1, 3, LATENT_HW)
    assert np.array_equal(diffusers_decode(prepared, latents), diffusers_decode(vae, latents))


# --- the graphs against vae.decode ----------------------------------------------------------------

def test_torch_graphs_chunk_by_chunk_are_vae_decode(vae):
    """The restructuring alone (diffusers' modules, 2-frame caches), before any export."""
    first, chunk = WanDecoderFirst(vae).eval(), WanDecoderChunk(vae).eval()
    latents = random_latents(1, 3, LATENT_HW, seed=1)
    got = decode_frames(torch_runner(first), torch_runner(chunk), latents.numpy())
    np.testing.assert_allclose(got, diffusers_decode(vae, latents), rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch,frames,hw", [
    (1, 1, LATENT_HW),  # text-to-image: decoder_first alone
    (1, 2, LATENT_HW),  # 5 video frames, 32 x 48 (non-square)
    (1, 3, LATENT_HW),  # 9 video frames
    (2, 3, (6, 4)),  # batch 2, 48 x 32
    (1, 5, (5, 3)),  # 17 video frames, 40 x 24 (odd latent sizes)
])
def test_onnx_chunked_decode_is_vae_decode(exported, vae, batch, frames, hw):
    latents = random_latents(batch, frames, hw, seed=frames)
    want = diffusers_decode(vae, latents)
    got = onnx_decode(exported, latents)
    assert got.shape == want.shape == (batch, 3, 1 + 4 * (frames - 1), 8 * hw[0], 8 * hw[1])
    assert want.std() > 0.05 and np.abs(want).max() < 1  # a real signal, not saturated by the clamp
    assert np.abs(got - want).max() <= BOUND


def test_chunks_without_the_carried_cache_miss(exported, vae):
    """Controls: each later chunk on zero caches, or always on decoder_first's caches."""
    latents = random_latents(1, 3, LATENT_HW, seed=3)
    want = diffusers_decode(vae, latents)
    run_first, run_chunk = exported["run"][FIRST], exported["run"][CHUNK]
    n = len(exported["caches"])
    first = run_first({LATENTS: latents[:, :, :1].numpy()})
    for label, caches in (("zeros", {cache_name(k): np.zeros_like(first[next_cache_name(k)]) for k in range(n)}),
                          ("first", {cache_name(k): first[next_cache_name(k)] for k in range(n)})):
        frames = [first[VIDEO]]
        for f in (1, 2):
            frames.append(run_chunk({LATENTS: latents[:, :, f:f + 1].numpy(), **caches})[VIDEO])
        error = np.abs(np.concatenate(frames, 2) - want).max()
        assert error > 100 * BOUND, label


def test_wan_pipeline_video_is_the_onnx_decode_of_its_latents(exported, wan_dir):
    """WanPipeline end to end: its ``output_type="np"`` video from its own ``"latent"`` output,
    through decode_frames and the postprocess the runtime applies (x / 2 + 0.5, clamp to [0, 1])."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(wan_dir, local_files_only=True)
    start = random_latents(1, 2, LATENT_HW, seed=5)
    common = dict(prompt="a red cat", height=HEIGHT, width=WIDTH, num_frames=5, num_inference_steps=2,
                  max_sequence_length=8)
    latents = pipe(latents=start.clone(), output_type="latent", **common).frames
    video = pipe(latents=start.clone(), output_type="np", **common).frames  # [B, frames, H, W, 3]
    got = np.clip(onnx_decode(exported, latents) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 4, 1)
    assert got.shape == video.shape == (1, 5, HEIGHT, WIDTH, 3)
    assert np.abs(got - video).max() <= BOUND


def test_clamp_is_in_the_graph(wan_dir, tmp_path):
    """The tiny VAE never leaves [-1, 1] (its last RMS norm bounds it), so here conv_out is scaled
    by 8 in both copies: a third of the video saturates, and the graphs still give vae.decode."""
    reference, copy = load_vae(wan_dir), load_vae(wan_dir)
    with torch.no_grad():
        for vae in (reference, copy):
            vae.decoder.conv_out.weight.mul_(8)
            vae.decoder.conv_out.bias.mul_(8)
    info = export_wan_decoder(copy, tmp_path, checks=())
    latents = random_latents(1, 2, LATENT_HW, seed=7)
    want = diffusers_decode(reference, latents)
    assert 0.2 < np.mean(np.abs(want) == 1) < 0.8
    got = decode_frames(ort_runner(info["paths"][FIRST]), ort_runner(info["paths"][CHUNK]), latents.numpy())
    assert np.abs(got - want).max() <= BOUND


# --- the interface --------------------------------------------------------------------------------

def test_graph_interfaces(exported, vae):
    specs = exported["caches"]
    assert specs == cache_specs(vae)
    assert len(specs) == 24  # causal convs with a temporal kernel (conv_shortcuts have none)
    assert {s["scale"] for s in specs} == {1, 2, 4, 8}
    assert exported["frames"] == {FIRST: 1, CHUNK: 4} and exported["scale"] == 8
    assert exported["cache_dtype"] == "float32"

    def cache_dims(k):
        s = specs[k]["scale"]
        suffix = "" if s == 1 else f"_x{s}"
        return ["batch", specs[k]["channels"], 2, f"latent_height{suffix}", f"latent_width{suffix}"]

    latents = {"name": LATENTS, "dtype": "float32", "shape": ["batch", 16, 1, "latent_height", "latent_width"]}
    caches_out = [{"name": next_cache_name(k), "dtype": "float32", "shape": cache_dims(k)} for k in range(len(specs))]
    for name, frames in ((FIRST, 1), (CHUNK, 4)):
        inputs, outputs = tensor_info(exported["paths"][name])
        video = {"name": VIDEO, "dtype": "float32", "shape": ["batch", 3, frames, "height", "width"]}
        assert outputs == [video, *caches_out], name
        caches_in = [] if name == FIRST else [{**c, "name": cache_name(k)} for k, c in enumerate(caches_out)]
        assert inputs == [latents, *caches_in], name
        assert [i["name"] for i in inputs] == exported["inputs"][name]
        assert [o["name"] for o in outputs] == exported["outputs"][name]
    for name in (FIRST, CHUNK):  # checked at shapes other than the traced one during the export
        assert all(max(e.values()) <= BOUND for e in exported["errors"][name])


def test_graphs_have_no_control_flow(exported):
    """No ``If``/``Loop`` (the exporter's dynamic ``squeeze`` became one before the attention swap):
    TensorRT builds straight-line graphs, and the nearest-exact upsampling is a plain ``Resize``."""
    import onnx

    for name in (FIRST, CHUNK):
        model = onnx.load(str(exported["paths"][name]), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"If", "Loop", "Scan"}, name
        resizes = [n for n in model.graph.node if n.op_type == "Resize"]
        assert len(resizes) == 3
        for node in resizes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["mode"] == b"nearest" and attrs["nearest_mode"] == b"floor"
            assert attrs["coordinate_transformation_mode"] == b"asymmetric"


def test_first_graph_starts_the_temporal_upsamplers_at_zero(exported, vae):
    """The ``"Rep"`` entries (one per upsample3d) come out as zeros; every other cache is
    [0, input of frame 0], diffusers' zero padding in front of its 1-frame cache."""
    out = exported["run"][FIRST]({LATENTS: random_latents(1, 1, LATENT_HW).numpy()})
    caches = [out[next_cache_name(k)] for k in range(len(exported["caches"]))]
    zero = [k for k, c in enumerate(caches) if not c.any()]
    assert len(zero) == sum(getattr(m, "mode", None) == "upsample3d" for m in vae.decoder.modules()) == 2
    for k, c in enumerate(caches):
        if k not in zero:
            assert not c[:, :, 0].any() and c[:, :, 1].any(), k


def test_decode_frames_refuses_bad_latents(exported):
    with pytest.raises(ValueError, match="latents"):
        decode_frames(exported["run"][FIRST], exported["run"][CHUNK], np.zeros((1, 16, 4, 6), np.float32))


def test_residual_patchified_vae_ti2v_layout(tmp_path):
    """Wan 2.2 TI2V-5B's VAE layout (residual up blocks with their first-chunk shortcut, 2 x 2
    patches, 16 x spatial): the same two graphs, unpatchified inside."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    reference = AutoencoderKLWan(**RESIDUAL).eval()
    copy = AutoencoderKLWan(**RESIDUAL).eval()
    copy.load_state_dict(reference.state_dict())
    info = export_wan_decoder(copy, tmp_path, trace_size=(2, 3), checks=((1, 3, 2),))
    assert info["scale"] == 16
    run_first, run_chunk = ort_runner(info["paths"][FIRST]), ort_runner(info["paths"][CHUNK])
    for frames in (1, 3):
        latents = random_latents(1, frames, (2, 3), seed=frames)
        want = diffusers_decode(reference, latents)
        got = decode_frames(run_first, run_chunk, latents.numpy())
        assert got.shape == want.shape == (1, 3, 1 + 4 * (frames - 1), 32, 48)
        assert np.abs(got - want).max() <= BOUND
