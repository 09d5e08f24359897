"""Low-memory mode against the default, in separate processes (peak RSS is per process).

    python benchmarks/low_memory.py --model PKG --size 512 --steps 4 --images 4 --out results.json

Modes: ``default`` (every engine resident, one generate per image), ``low-per-item`` (memory="low",
one generate per image: every component loaded per image) and ``low-phased`` (memory="low", one
generate_many for all images: each component loaded once). Reports wall seconds from load to the
last image, images/s, peak RSS, and whether every mode made the same images as ``default``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time

MODES = ("default", "low-per-item", "low-phased")


def child(model: str, mode: str, size: int | None, steps: int, images: int) -> dict:
    from artrt.runtime import Pipeline

    started = time.perf_counter()
    pipe = Pipeline.load(model, backend="ort-cpu", memory="default" if mode == "default" else "low")
    requests = [dict(prompt=f"a lighthouse {k}", steps=steps, seed=k, height=size, width=size) for k in range(images)]
    outs = pipe.generate_many(requests) if mode == "low-phased" else [pipe.generate(**r) for r in requests]
    seconds = time.perf_counter() - started
    digest = hashlib.sha256(b"".join(image.tobytes() for out in outs for image in out.images)).hexdigest()
    return {"mode": mode, "seconds": seconds, "images_per_s": images / seconds, "sha256": digest,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--size", type=int)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--out")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child, args.size, args.steps, args.images)))
        return
    results = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--images",
               str(args.images), "--child", mode] + (["--size", str(args.size)] if args.size else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{mode} failed:\n{done.stderr}")
        results.append(json.loads(done.stdout))
    same = all(r["sha256"] == results[0]["sha256"] for r in results)
    for r in results:
        print(f"{r['mode']:<14} {r['seconds']:8.2f} s  {r['images_per_s']:6.3f} img/s  "
              f"peak RSS {r['peak_rss_mib']:8.0f} MiB")
    print(f"same images in every mode: {same}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "size": args.size, "steps": args.steps, "images": args.images,
                       "same_images": same, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
