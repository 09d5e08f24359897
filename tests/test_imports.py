"""The runtime must import and run its pure parts without torch, diffusers or transformers."""

from __future__ import annotations

import subprocess
import sys

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "diffusers", "transformers", "optimum"}:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_runtime_imports_without_torch():
    code = BLOCK_TORCH + """
from artrt.runtime import Pipeline
import artrt.runtime.cli, artrt.runtime.samplers, artrt.runtime.schedules, artrt.engines.ort
assert "torch" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_generate_runs_without_torch(sdxl_package, tmp_path):
    code = BLOCK_TORCH + f"""
from artrt.runtime import Pipeline
with Pipeline.load({str(sdxl_package)!r}, backend="ort-cpu") as pipe:
    out = pipe.generate("a red circle", steps=3, seed=1)
assert "torch" not in sys.modules
print(out.images[0].size)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(32, 32)"
