"""The Python API refuses malformed calls with one InputError line naming what is wrong:
generate_many's requests, and tiled decoding asked of a package with nothing to tile."""

from __future__ import annotations

import pytest

from artrt.demo.cache import shipped_package
from artrt.errors import InputError
from artrt.runtime import Pipeline


@pytest.fixture(scope="module")
def demo():
    with Pipeline.load(shipped_package(), backend="ort-cpu", threads=1) as pipe:
        yield pipe


@pytest.mark.parametrize(("requests", "message"), [
    ([{"prompt": "x", "foo": 1}], r"^request 0: unknown argument 'foo' \(generate takes prompt, negative_prompt, "),
    ([{"prompt": "x"}, {"seed": 1}], r"^request 1: prompt is required$"),
    (["a red circle"], r"^request 0: a dict of generate\(\)'s arguments is expected, got str$"),
    ({"prompt": "x"}, r"^requests must be a list of dicts of generate\(\)'s arguments, got dict$"),
    ("a red circle", r"^requests must be a list of dicts"),
])
def test_malformed_generate_many_requests_are_one_line(demo, requests, message):
    with pytest.raises(InputError, match=message):
        demo.generate_many(requests)


def test_tiles_asked_of_a_package_without_a_vae_are_refused():
    with pytest.raises(InputError, match=r"^vae_tile \(--vae-tiles\): tiled decoding is for image VAE decoders; "
                                         r"this package draws pixels, it has no VAE decoder$"):
        Pipeline.load(shipped_package(), backend="ort-cpu", vae_tile=64)
