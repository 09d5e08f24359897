"""LoRA input errors (one clear line each, before anything changes) and the --lora option of the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from lora_helpers import UNET_TARGETS, lora_package, random_adapter, save_diffusers_lora
from safetensors.torch import save_file

from artrt.errors import InputError
from artrt.runtime import Lora, Pipeline
from artrt.runtime.cli import main
from artrt.runtime.images import read_parameters
from artrt.runtime.lora import read_lora_file


@pytest.fixture(scope="module")
def package(sdxl_package, models_dir, tmp_path_factory) -> Path:
    return lora_package(sdxl_package, models_dir, tmp_path_factory.mktemp("lora_input") / "pkg")


@pytest.fixture(scope="module")
def lora_files(models_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora_input_files")
    base = UNet2DConditionModel.from_pretrained(models_dir / "base" / "unet")
    refiner = UNet2DConditionModel.from_pretrained(models_dir / "refiner" / "unet")
    state, config = random_adapter(base, UNET_TARGETS, rank=4, alpha=8, seed=1)
    files = {"base": save_diffusers_lora(folder / "base.safetensors", unet=state, unet_config=config)}
    state, _ = random_adapter(refiner, UNET_TARGETS, rank=4, alpha=4, seed=2)
    files["refiner"] = save_diffusers_lora(folder / "refiner.safetensors", unet=state)
    ghost = {"unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.ones(2, 32),
             "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": torch.ones(32, 2)}
    first = next(k for k in state if k.endswith("proj_in.lora_A.weight"))
    second = first.replace("lora_A", "lora_B")
    ghost.update({f"unet.{first}": state[first], f"unet.{second}": state[second]})
    files["ghost"] = _save(folder / "ghost.safetensors", ghost)
    return files


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": -0.5}, "scale must be a finite number >= 0, got -0.5"),
    ({"scale": float("nan")}, "scale must be a finite number >= 0, got nan"),
    ({"scale": float("inf")}, "scale must be a finite number >= 0, got inf"),
    ({"scale": True}, "scale must be a finite number >= 0, got True"),
    ({"scale": "1"}, "scale must be a finite number >= 0, got '1'"),
    ({"expert": "refiner"}, "unknown expert 'refiner'; choose from composition, detail, both"),
])
def test_bad_lora_values_are_one_line(kwargs, message):
    with pytest.raises(InputError) as error:
        Lora("style.safetensors", **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("spec, expected", [
    ("style.safetensors", ("style.safetensors", 1.0, "both")),
    ("style.safetensors:0.8", ("style.safetensors", 0.8, "both")),
    ("dir/style.safetensors:0.8@composition", ("dir/style.safetensors", 0.8, "composition")),
    ("style.safetensors@detail", ("style.safetensors", 1.0, "detail")),
    ("C:/loras/x@2/style.safetensors", ("C:/loras/x@2/style.safetensors", 1.0, "both")),
])
def test_lora_spec(spec, expected):
    lora = Lora.parse(spec)
    assert (str(lora.file), lora.scale, lora.expert) == expected


@pytest.mark.parametrize("spec, message", [
    ("style.safetensors:strong", "scale 'strong' is not a number"),
    ("style.safetensors:-1", "scale must be a finite number >= 0, got -1.0"),
    ("style.safetensors@refiner", "unknown expert 'refiner'"),
    (":0.5", "no file"),
])
def test_bad_lora_specs(spec, message):
    with pytest.raises(InputError, match=message):
        Lora.parse(spec)


def test_unknown_formats_are_one_line(tmp_path):
    cases = {
        "lycoris.safetensors": ({"lora_unet_down_blocks_0_attn.hada_w1_a": torch.ones(2, 2)}, "LyCORIS LoHa is not"),
        "dora.safetensors": ({"unet.x.lora_magnitude_vector": torch.ones(2)}, "DoRA is not supported"),
        "other.safetensors": ({"model.layers.0.weight": torch.ones(2, 2)},
                              "unknown LoRA format: key 'model.layers.0.weight' is neither diffusers/PEFT"),
        "half.safetensors": ({"unet.a.lora_A.weight": torch.ones(2, 4)}, "unet.a has only its down matrix"),
        "ranks.safetensors": ({"unet.a.lora_A.weight": torch.ones(2, 4), "unet.a.lora_B.weight": torch.ones(4, 3)},
                              "unet.a has down [2, 4] and up [4, 3], which do not make a low-rank update"),
    }
    for name, (tensors, message) in cases.items():
        with pytest.raises(InputError, match=re.escape(message)):
            read_lora_file(_save(tmp_path / name, tensors))
    (tmp_path / "notes.txt").write_text("not a lora")
    with pytest.raises(InputError, match="is not a LoRA file artrt can read"):
        read_lora_file(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="cannot read LoRA file"):
        read_lora_file(tmp_path / "missing.safetensors")


def test_targets_that_do_not_fit_name_the_first_and_count(package, lora_files):
    with pytest.raises(InputError) as error:
        Pipeline.load(package, backend="ort-cpu", loras=[Lora(lora_files["ghost"], 1.0, "composition")])
    assert str(error.value) == ("LoRA ghost.safetensors (composition): 1 of 2 weights match expert_composition; the "
                                "first that does not: unet down_blocks.7.attentions.0.proj_in is not a weight of "
                                "expert_composition")
    with pytest.raises(InputError) as error:  # a refiner LoRA on the composition expert
        Pipeline.load(package, backend="ort-cpu", loras=[Lora(lora_files["refiner"], 1.0, "composition")])
    message = str(error.value)
    assert message.startswith("LoRA refiner.safetensors (composition): ") and "\n" not in message
    assert " weights match expert_composition; the first that does not: " in message
    assert "in the LoRA" in message and "in expert_composition (a LoRA for another model?)" in message
    with pytest.raises(InputError, match=r"refiner\.safetensors \(both\): \d+ of \d+ weights match expert_composition, "
                                         r"expert_detail"):
        Pipeline.load(package, backend="ort-cpu", loras=[Lora(lora_files["refiner"])])


def test_a_package_without_targets_says_so(sdxl_package, lora_files, tmp_path):
    """A package exported before LoRA targets were recorded (its files and manifest entries removed)."""
    import dataclasses
    import shutil

    from artrt.runtime.package import read_manifest, write_manifest

    old = Path(shutil.copytree(sdxl_package, tmp_path / "old"))
    m = read_manifest(old, verify_hashes=False)
    for target in old.glob("*/lora_targets.json"):
        target.unlink()
    write_manifest(old, dataclasses.replace(m, files=tuple(f for f in m.files if "lora_targets" not in f.path)))
    with pytest.raises(InputError, match=r"has no LoRA targets for expert_composition "
                                         r"\(expert_composition/lora_targets\.json\)"):
        Pipeline.load(old, backend="ort-cpu", loras=[Lora(lora_files["base"], 1.0, "composition")])


def test_a_refused_set_leaves_the_active_one(package, lora_files):
    good = [Lora(lora_files["base"], 0.7, "composition")]
    with Pipeline.load(package, backend="ort-cpu", threads=1, loras=good) as pipe:
        before = np.asarray(pipe.generate("x", steps=3).images[0])
        with pytest.raises(InputError, match="ghost.safetensors"):
            pipe.set_loras([Lora(lora_files["refiner"], 1.0, "detail"), Lora(lora_files["ghost"], 1.0, "composition")])
        assert [r["file"] for r in pipe.loras] == [str(lora_files["base"])]
        assert np.array_equal(np.asarray(pipe.generate("x", steps=3).images[0]), before)


def test_cli_generate_and_sample_record_loras(capsys, package, lora_files, tmp_path):
    spec = f"{lora_files['base']}:0.5@composition"
    out = tmp_path / "img.png"
    assert main(["generate", "a lighthouse", "--model", str(package), "-o", str(out), "--steps", "3",
                 "--lora", spec, "--lora", f"{lora_files['refiner']}:1.5@detail"]) == 0, capsys.readouterr().err
    recorded = read_parameters(out)["loras"]
    assert [(r["file"], r["scale"], r["expert"]) for r in recorded] == [
        (str(lora_files["base"]), 0.5, "composition"), (str(lora_files["refiner"]), 1.5, "detail")]
    assert all(len(r["sha256"]) == 64 for r in recorded)

    prompts = tmp_path / "p.txt"
    prompts.write_text("a lighthouse\n")
    job = ["sample", str(prompts), "--model", str(package), "--out", str(tmp_path / "set"), "--steps", "3"]
    assert main([*job, "--lora", spec]) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "set" / "metadata.jsonl").read_text())
    assert record["loras"] == recorded[:1]
    assert read_parameters(tmp_path / "set" / record["file"])["loras"] == recorded[:1]
    assert json.loads((tmp_path / "set" / "run.json").read_text())["loras"][0]["scale"] == 0.5
    capsys.readouterr()
    assert main(job) == 1  # the set was made with the LoRA: resuming without it is another job
    assert "with LoRAs base.safetensors:0.5@composition, this job asks for no LoRAs" in capsys.readouterr().err

    assert main(["generate", "x", "--model", str(package), "-o", str(out), "--lora", "a.safetensors:big"]) == 1
    err = capsys.readouterr().err
    assert "artrt: error: --lora a.safetensors:big: scale 'big' is not a number" in err and "Traceback" not in err


def test_lora_weights_count_in_the_memory_checks(package, lora_files, monkeypatch):
    """The weights a LoRA set replaces are added to the load check and checked before a swap."""
    from artrt.runtime import budget
    from artrt.runtime.lora_weights import prepare_loras
    from artrt.runtime.package import read_manifest

    m = read_manifest(package)
    lora = Lora(lora_files["base"], 1.0, "composition")
    with Pipeline.load(package, backend="ort-cpu", threads=1) as pipe:
        files = {n: pipe._opened.weight_file(n) for n in m.components}
        before = np.asarray(pipe.generate("x", steps=3).images[0])
        plan = prepare_loras(package, m, [lora], files, {n: "fp32" for n in files})
        computed = {n: sum(a.nbytes for a in plan.weights(n).values()) for n in plan.updates}
        assert plan.replaced_bytes() == computed and computed["expert_composition"] > 0
        with monkeypatch.context() as patch, pytest.raises(
                InputError, match=r"^these LoRAs replace about 0\.0 GiB of one component's weights"):
            patch.setattr(budget, "available_memory", lambda: 1024)
            pipe.set_loras([lora])
        assert pipe.loras == [] and np.array_equal(np.asarray(pipe.generate("x", steps=3).images[0]), before)
    weights = sum(budget.weight_bytes(m, n) for n in m.components)
    room = int((weights + computed["expert_composition"] // 2) / budget.HEADROOM)
    monkeypatch.setattr(budget, "available_memory", lambda: room)
    Pipeline.load(package, backend="ort-cpu", threads=1).close()  # the package alone fits
    with pytest.raises(InputError, match=r"needs about [\d.]+ GiB of memory for its weights \(LoRA weights"):
        Pipeline.load(package, backend="ort-cpu", threads=1, loras=[lora])


def test_the_lean_demo_package_says_how_to_take_a_lora(tmp_path):
    from safetensors.numpy import save_file

    from artrt.demo.cache import shipped_package

    file = tmp_path / "demo_lora.safetensors"
    save_file({"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": np.ones((2, 96), np.float32),
               "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": np.ones((96, 2), np.float32)}, str(file))
    with pytest.raises(InputError, match=r"has no LoRA targets for expert_composition .*: its lean graphs .* take no "
                                         r"LoRA: use a full export \(for the demo model: python -m "
                                         r"artrt.export.shapes_demo --fp32 --out DIR\)$"):
        Pipeline.load(shipped_package(), backend="ort-cpu", loras=[Lora(file, 1.0, "composition")])
