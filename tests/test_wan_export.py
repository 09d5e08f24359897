"""Wan 2.2 export (issue 16): the random WanPipeline folder, the fused flow step and UMT5 as ONNX.

The proofs, each against diffusers: the random folder loads offline and generates 1 and 5
frames; the step module follows ``runtime/flow.py``'s ``flow_step`` around the transformer as
``WanPipeline`` calls it; the ONNX graphs match PyTorch on shapes other than the traced ones
(1 and 2 latent frames with one graph); the text encoder graph gives ``encode_prompt``'s states;
and a numpy loop over the two exported experts with ``plan_flow_steps`` and ``wan_segments``
ends on ``WanPipeline``'s own latents (UniPC across the expert switch). Export extra only;
about 40 s on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from artrt.export.onnx_io import check_onnx, tensor_info
from artrt.export.wan_graphs import (
    FLOW_STEP_SCALARS,
    STEP_OUTPUTS,
    ExportAttnProcessor,
    ManualRMSNorm,
    WanFlowStepGraph,
    export_wan_step,
    export_wan_text_encoder,
    prepare_transformer,
    step_inputs,
    token_ids,
)
from artrt.export.wan_models import BOUNDARY_RATIO, FLOW_SHIFT, SIZES, main, write_wan_pair
from artrt.runtime.flow import FlowScheduleConfig, flow_step, plan_flow_steps, wan_segments

TINY = SIZES["tiny"]
TEXT_DIM = TINY.transformer["text_dim"]
HEIGHT, WIDTH = TINY.defaults["height"], TINY.defaults["width"]  # 32 x 48 pixels: 4 x 6 latents
LATENT_HW = (HEIGHT // 8, WIDTH // 8)
TRACE = dict(batch=1, frames=2, height=4, width=6, text_length=16)  # the traced shapes
BOUND = 1e-4  # fp32 ONNX vs PyTorch, relative to max(1, |output|)
LOOP_BOUND = 1e-5  # whole loop vs WanPipeline, relative to max |latents|
PROMPT, NEGATIVE = "a red cat with a blue dog", "blurry, low quality"
GUIDANCE = (4.0, 3.0)  # guidance_scale, guidance_scale_2


def latent_frames(num_frames: int) -> int:
    return (num_frames - 1) // 4 + 1


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return write_wan_pair(tmp_path_factory.mktemp("wan") / "pair", size="tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(wan_dir):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(wan_dir, local_files_only=True)


def load_transformer(wan_dir: Path, name: str = "transformer"):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(wan_dir / name, local_files_only=True).eval()


@pytest.fixture(scope="module")
def exported(wan_dir, tmp_path_factory):
    """Both experts and the text encoder as ONNX (each from its own copy of the weights, so the
    pipeline's modules stay diffusers' own), with the export modules and ORT sessions."""
    import onnxruntime as ort
    from transformers import UMT5EncoderModel

    out = tmp_path_factory.mktemp("wan-onnx")
    trace = step_inputs(TRACE["batch"], TRACE["frames"], TRACE["height"], TRACE["width"], TRACE["text_length"],
                        TEXT_DIM, seed=0)
    graphs, paths = {}, {}
    for name in ("transformer", "transformer_2"):
        paths[name] = out / f"{name}.onnx"
        graphs[name], _ = export_wan_step(load_transformer(wan_dir, name), paths[name], trace, [])
    encoder = UMT5EncoderModel.from_pretrained(wan_dir / "text_encoder", local_files_only=True).eval()
    paths["text_encoder"] = out / "text_encoder.onnx"
    ids = token_ids(1, TRACE["text_length"], encoder.config.vocab_size, encoder.config.pad_token_id)
    graphs["text_encoder"], _ = export_wan_text_encoder(encoder, paths["text_encoder"], ids, [])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for k, p in paths.items()}
    return {"paths": paths, "graphs": graphs, "sessions": sessions}


# --- the random folder ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_frames", [1, 5])
def test_wan_pair_loads_offline_and_generates(pipe, num_frames):
    assert type(pipe).__name__ == "WanPipeline"
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == BOUNDARY_RATIO
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert type(pipe.tokenizer).__name__ == "T5TokenizerFast"
    common = dict(negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=num_frames,
                  num_inference_steps=4, guidance_scale=GUIDANCE[0], guidance_scale_2=GUIDANCE[1],
                  max_sequence_length=16)
    g = torch.Generator().manual_seed(0)
    latents = pipe(PROMPT, generator=g, output_type="latent", **common).frames
    assert tuple(latents.shape) == (1, 16, latent_frames(num_frames), *LATENT_HW)
    assert torch.isfinite(latents).all()
    video = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **common).frames
    assert video.shape == (1, num_frames, HEIGHT, WIDTH, 3)
    assert np.isfinite(video).all() and video.min() >= 0 and video.max() <= 1 and video.std() > 0


def test_one_expert_layout_from_the_command_line(tmp_path):
    from diffusers import WanPipeline

    main([str(tmp_path / "wan21"), "--one-expert", "--seed", "3"])
    index = json.loads((tmp_path / "wan21" / "model_index.json").read_text())
    assert index["boundary_ratio"] is None and index["transformer_2"] == [None, None]
    assert not (tmp_path / "wan21" / "transformer_2").exists()
    pipe = WanPipeline.from_pretrained(tmp_path / "wan21", local_files_only=True)
    assert pipe.transformer_2 is None
    out = pipe(PROMPT, height=HEIGHT, width=WIDTH, num_frames=1, num_inference_steps=2, output_type="latent",
               max_sequence_length=8, generator=torch.Generator().manual_seed(0)).frames
    assert tuple(out.shape) == (1, 16, 1, *LATENT_HW)


def test_weights_follow_the_seed_and_the_experts_differ(wan_dir, tmp_path):
    high, low = load_transformer(wan_dir), load_transformer(wan_dir, "transformer_2")
    assert {k: v for k, v in high.config.items() if k != "_name_or_path"} == \
        {k: v for k, v in low.config.items() if k != "_name_or_path"}
    assert not torch.equal(high.proj_out.weight, low.proj_out.weight)
    again = write_wan_pair(tmp_path / "again", seed=0)
    assert torch.equal(load_transformer(again, "transformer_2").proj_out.weight, low.proj_out.weight)


def test_tokenizer_is_umt5_shaped_and_tokenizers_reads_it(pipe, wan_dir):
    from tokenizers import Tokenizer

    tok = pipe.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    enc = tok(["a cat", "ü"], padding="max_length", max_length=8, truncation=True)
    assert enc.input_ids[0][-1] == 0 and 1 in enc.input_ids[0] and 2 in enc.input_ids[1]
    assert enc.attention_mask[0] == [int(i != 0) for i in enc.input_ids[0]]
    # the runtime tokenizes with `tokenizers` alone, from the same file
    raw = Tokenizer.from_file(str(wan_dir / "tokenizer" / "tokenizer.json"))
    for text in (PROMPT, NEGATIVE, "  Two  spaces, UPPER & digits 123!", ""):
        assert raw.encode(text).ids == tok(text).input_ids, text
        assert raw.encode(text).ids[-1] == 1


def test_scheduler_is_wan22s_and_artrt_reads_it(wan_dir):
    config = json.loads((wan_dir / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "UniPCMultistepScheduler"
    assert FlowScheduleConfig.from_diffusers(config) == FlowScheduleConfig(1000, FLOW_SHIFT)


# --- the step module ------------------------------------------------------------------------------

def test_flow_step_columns_match_the_runtime():
    from artrt.runtime.flow import FLOW_STEP_SCALARS as RUNTIME_COLUMNS

    assert FLOW_STEP_SCALARS == RUNTIME_COLUMNS


def test_export_preparation_keeps_the_values(wan_dir):
    original = load_transformer(wan_dir)
    prepared = prepare_transformer(load_transformer(wan_dir))
    assert not any(isinstance(m, torch.nn.RMSNorm) for m in prepared.modules())
    assert sum(isinstance(m, ManualRMSNorm) for m in prepared.modules()) == 4 * TINY.transformer["num_layers"]
    assert all(isinstance(p, ExportAttnProcessor) for p in prepared.attn_processors.values())
    inputs = step_inputs(2, 3, 6, 4, 11, TEXT_DIM, seed=4)
    with torch.no_grad():
        expected = WanFlowStepGraph(original)(*inputs.values())
        got = WanFlowStepGraph(prepared)(*inputs.values())
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_manual_rms_norm_is_torchs(dtype):
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.RMSNorm(24, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=g))
        x = (torch.randn(64, 7, 24, generator=g) * 3).to(dtype)
        torch.testing.assert_close(ManualRMSNorm(norm)(x), norm(x), rtol=0, atol=0)


def _diffusers_guided(transformer, x_in: np.ndarray, t: float, cond: torch.Tensor, guidance: float) -> np.ndarray:
    """The guided velocity as WanPipeline computes it: two calls (cond, then uncond), then CFG."""
    x = torch.from_numpy(np.ascontiguousarray(x_in))
    timestep = torch.tensor([t]).expand(x.shape[0])
    with torch.no_grad():
        uncond_states, cond_states = cond.chunk(2)
        c = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond_states, return_dict=False)[0]
        u = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond_states, return_dict=False)[0]
    return (u + guidance * (c - u)).numpy()


@pytest.mark.parametrize("frames", [1, 2])
def test_step_module_is_flow_step_around_the_transformer(wan_dir, frames):
    transformer = load_transformer(wan_dir, "transformer_2")
    inputs = step_inputs(1, frames, *LATENT_HW, 12, TEXT_DIM, seed=frames)
    with torch.no_grad():
        got = WanFlowStepGraph(transformer)(*inputs.values())
    row = inputs["step"].numpy()
    guidance = float(row[FLOW_STEP_SCALARS.index("guidance")])
    net = lambda x, t: _diffusers_guided(transformer, x, t, inputs["encoder_hidden_states"], guidance)
    latents = [inputs[k].numpy() for k in ("sample", "sample_prev", "denoised_prev", "noise")]
    expected = flow_step(net, *latents, row)
    for name, e, g in zip(STEP_OUTPUTS, expected, got):
        np.testing.assert_allclose(g.numpy(), e, rtol=0, atol=1e-5, err_msg=name)


# --- the ONNX graphs ------------------------------------------------------------------------------

@pytest.mark.parametrize("expert,batch,frames,hw,text_length", [
    ("transformer", 1, 1, LATENT_HW, 16),  # 1 frame (text-to-image)
    ("transformer", 1, 2, LATENT_HW, 16),  # 5 frames
    ("transformer_2", 2, 2, LATENT_HW[::-1], 9),
    ("transformer_2", 1, 3, (8, 8), 24),
])
def test_step_onnx_matches_pytorch_on_new_shapes(exported, expert, batch, frames, hw, text_length):
    inputs = step_inputs(batch, frames, *hw, text_length, TEXT_DIM, seed=10 + frames)
    errors = check_onnx(exported["graphs"][expert], inputs, STEP_OUTPUTS, exported["paths"][expert], BOUND)
    assert set(errors) == set(STEP_OUTPUTS) and max(errors.values()) < BOUND


def test_step_onnx_inputs_and_outputs(exported):
    inputs, outputs = tensor_info(exported["paths"]["transformer"])
    latent = ["batch", 16, "latent_frames", "latent_height", "latent_width"]
    assert [(i["name"], i["dtype"], i["shape"]) for i in inputs] == [
        *[(n, "float32", latent) for n in ("sample", "sample_prev", "denoised_prev", "noise")],
        ("step", "float32", [13]),
        ("encoder_hidden_states", "float32", ["cond_batch", "text_length", TEXT_DIM]),
    ]
    assert [(o["name"], o["dtype"], o["shape"]) for o in outputs] == [(n, "float32", latent) for n in STEP_OUTPUTS]


def test_fp16_network_keeps_the_update_in_fp32(exported, tmp_path):
    """The half-precision step: fp16 transformer and conditioning, fp32 latents in and out (the
    sampler update stays fp32), within the package exporter's fp16 tolerance of the fp32 module."""
    import copy

    from artrt.export.onnx_io import compare_onnx, export_onnx, run_module
    from artrt.export.wan_graphs import COND_AXES, LATENT_AXES, LATENT_NAMES

    graph32 = exported["graphs"]["transformer"]
    graph16 = WanFlowStepGraph(copy.deepcopy(graph32.transformer).half()).eval()
    half = lambda inputs: {k: v.half() if k == "encoder_hidden_states" else v for k, v in inputs.items()}
    trace = step_inputs(1, 2, *LATENT_HW, 16, TEXT_DIM, seed=0)
    axes = {n: LATENT_AXES for n in LATENT_NAMES} | {"encoder_hidden_states": COND_AXES}
    path = tmp_path / "step_fp16.onnx"
    export_onnx(graph16, half(trace), STEP_OUTPUTS, axes, path)
    inputs, outputs = tensor_info(path)
    assert {i["name"]: i["dtype"] for i in inputs} == {**{n: "float32" for n in LATENT_NAMES[:4]},
                                                       "step": "float32", "encoder_hidden_states": "float16"}
    assert all(o["dtype"] == "float32" for o in outputs)
    for frames in (1, 2):
        check = step_inputs(2, frames, *LATENT_HW[::-1], 12, TEXT_DIM, seed=20 + frames)
        errors = compare_onnx(path, half(check), run_module(graph32, check), STEP_OUTPUTS, 5e-2)
        assert 0 < max(errors.values()) < 5e-2  # fp16 rounding is there, and small


def _encode(exported, tokenizer, prompts: list[str], length: int) -> np.ndarray:
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
    return exported["sessions"]["text_encoder"].run(None, {"input_ids": ids.astype(np.int64)})[0]


@pytest.mark.parametrize("length", [8, 24, 40])
def test_text_encoder_onnx_is_encode_prompt(exported, pipe, length):
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, NEGATIVE, True, max_sequence_length=length, device="cpu")
    expected = torch.cat([uncond, cond]).numpy()
    got = _encode(exported, pipe.tokenizer, [NEGATIVE, PROMPT], length)
    assert got.shape == expected.shape == (2, length, TEXT_DIM)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    used = len(pipe.tokenizer(NEGATIVE).input_ids)
    if used < length:  # diffusers zeroes the states past the prompt
        assert not got[0, used:].any() and np.abs(got[0, :used]).min(axis=-1).max() > 0


# --- the whole denoising loop ---------------------------------------------------------------------

def onnx_denoise(exported, plan, segments, latents: np.ndarray, cond: np.ndarray) -> np.ndarray:
    """``run_flow_plan`` with the exported experts: three carried buffers from (latents, 0, 0), never
    reset between experts; each segment's guidance written into its rows."""
    sessions = [exported["sessions"]["transformer"], exported["sessions"]["transformer_2"]]
    sample = latents.astype(np.float32)
    sample_prev, denoised_prev, noise = np.zeros_like(sample), np.zeros_like(sample), np.zeros_like(sample)
    guidance = FLOW_STEP_SCALARS.index("guidance")
    for segment in segments:
        for i in range(segment.start, segment.stop):
            row = plan.scalars[i].copy()
            row[guidance] = segment.guidance
            sample, denoised_prev, sample_prev = sessions[segment.expert].run(None, {
                "sample": sample, "sample_prev": sample_prev, "denoised_prev": denoised_prev, "noise": noise,
                "step": row, "encoder_hidden_states": cond})
    return sample


@pytest.mark.parametrize("num_frames,steps", [(1, 10), (5, 12)])
def test_denoising_loop_with_onnx_experts_is_wan_pipelines(exported, pipe, wan_dir, num_frames, steps):
    length = 24
    shape = (1, 16, latent_frames(num_frames), *LATENT_HW)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = pipe(PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=num_frames,
                        num_inference_steps=steps, guidance_scale=GUIDANCE[0], guidance_scale_2=GUIDANCE[1],
                        latents=latents.clone(), output_type="latent", max_sequence_length=length).frames.numpy()
    scheduler = json.loads((wan_dir / "scheduler" / "scheduler_config.json").read_text())
    config = FlowScheduleConfig.from_diffusers(scheduler)
    plan = plan_flow_steps(config, "unipc", steps)
    segments = wan_segments(plan.timesteps, pipe.config.boundary_ratio, config.num_train_timesteps, GUIDANCE)
    assert [s.expert for s in segments] == [0, 1]  # the switch happens inside the run
    cond = _encode(exported, pipe.tokenizer, [NEGATIVE, PROMPT], length)
    got = onnx_denoise(exported, plan, segments, latents.numpy(), cond)
    scale = float(np.abs(expected).max())
    error = float(np.abs(got - expected).max())
    assert error <= LOOP_BOUND * scale, (error, scale)
    # controls: the comparison sees the switch, the history across it and the second guidance scale
    switch = segments[1].start
    reset = plan_flow_steps(config, "unipc", steps, history_resets=(switch,))
    one_expert = [type(segments[0])(0, 0, steps, GUIDANCE[0])]
    same_guidance = wan_segments(plan.timesteps, pipe.config.boundary_ratio, 1000, (GUIDANCE[0],) * 2)
    for other_plan, other_segments in ((reset, segments), (plan, one_expert), (plan, same_guidance)):
        other = onnx_denoise(exported, other_plan, other_segments, latents.numpy(), cond)
        assert float(np.abs(other - expected).max()) > 100 * LOOP_BOUND * scale
