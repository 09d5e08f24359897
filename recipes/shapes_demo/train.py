"""Train the embedded demo model: a base denoiser on all noise levels, then two expert copies.

    python recipes/shapes_demo/train.py --out build/shapes-train            # ~2.5 h on 2 CPU cores
    cp -r build/shapes-train/weights/{composition,detail} demo/weights/     # then write demo.json

The defaults are the shipped weights' recipe (docs/demo-model.md shows how they ran the two
experts side by side, one core each).

Stages, each resumable (``OUT/<stage>.pt`` is written every ``--checkpoint-every`` steps and a
stopped run continues where it was): ``data`` (shapes-world examples of the training split,
MiniLM states of every caption), ``base`` (all t), ``composition`` (t >= the composition floor)
and ``detail`` (t < the detail ceiling), both fine-tuned from the base's EMA weights, as in
eDiff-I. Outputs: ``OUT/weights/{base,composition,detail}`` (fp16 safetensors + config).
Everything is seeded; the same command on the same software gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from artrt.demo.captions import caption, word_sides
from artrt.demo.text_head import TextHead
from artrt.demo.world import layout, sample_example, sample_spec
from artrt.export.graphs import TextEncoderGraph
from artrt.export.shapes_demo import MAX_TOKENS, PATCH, SCHEDULER_CONFIG, UNET_CONFIG, load_text_encoder
from artrt.files import write_atomic

log = logging.getLogger("train")


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    lr: float
    t_range: tuple[int, int]  # timesteps sampled uniformly in [lo, hi)


ROLE_SCALE = 3.0  # the text head writes +-3 (a third of a MiniLM token state's norm) along ROLE_DIRECTION


def make_data(out: Path, examples: int, seed: int) -> dict[str, torch.Tensor]:
    """Render ``examples`` training-split examples and encode their captions (cached in OUT/data.pt).

    ``sides`` ``[captions, MAX_TOKENS]``: each token's :func:`artrt.demo.captions.word_sides`, the
    text head's auxiliary target (a cache written before it existed gets it added)."""
    path = out / "data.pt"
    if path.is_file():
        data = torch.load(path)
        if "sides" not in data:
            data["sides"] = token_sides(replay_captions(examples, seed))
            assert len(data["sides"]) == len(data["states"]), "data.pt was made with other --examples/--seed"
            write_atomic(path.resolve(), lambda p: torch.save(data, p))
        return data
    rng = np.random.default_rng(seed)
    images = np.empty((examples, 32, 32, 3), dtype=np.uint8)
    captions: dict[str, int] = {"": 0}  # index 0: the empty prompt (classifier-free guidance)
    index = np.empty(examples, dtype=np.int64)
    started = time.perf_counter()
    for i in range(examples):
        example = sample_example(rng, "train")
        images[i] = example.image
        index[i] = captions.setdefault(example.caption, len(captions))
        if (i + 1) % 10000 == 0:
            log.info("rendered %d/%d examples (%.0f s)", i + 1, examples, time.perf_counter() - started)
    states = encode(list(captions))
    data = {"images": torch.from_numpy(images), "caption_index": torch.from_numpy(index), "states": states,
            "sides": token_sides(list(captions))}
    torch.save(data, path)
    log.info("%d examples, %d distinct captions", examples, len(captions))
    return data


def replay_captions(examples: int, seed: int) -> list[str]:
    """The distinct captions of :func:`make_data`, in its order, without rendering (same random draws)."""
    rng = np.random.default_rng(seed)
    captions: dict[str, None] = {"": None}
    for _ in range(examples):
        spec = sample_spec(rng, "train")  # as sample_example draws: spec, caption, layout
        captions.setdefault(caption(spec, rng))
        layout(spec, rng)
    return list(captions)


def token_sides(captions: list[str]) -> torch.Tensor:
    """Per caption and token: the side of the object its word describes (+1 left/top, -1 other, 0 none)."""
    tokenizer = load_text_encoder().tokenizer
    batch = tokenizer(captions, padding="max_length", truncation=True, max_length=MAX_TOKENS)
    sides = torch.zeros(len(captions), MAX_TOKENS, dtype=torch.int8)
    for i, text in enumerate(captions):
        words = word_sides(text)
        for j, word in enumerate(batch.word_ids(i)):
            if word is not None:
                sides[i, j] = words[word]
    return sides


@torch.no_grad()
def encode(captions: list[str], batch: int = 256) -> torch.Tensor:
    """MiniLM token states ``[N, MAX_TOKENS, 384]`` (fp16), computed as the exported graph does."""
    source = load_text_encoder()
    graph = TextEncoderGraph(source.model, None, False, source.mask_pad_id).eval()
    chunks = []
    for start in range(0, len(captions), batch):
        ids = source.tokenizer(captions[start:start + batch], padding="max_length", truncation=True,
                               max_length=MAX_TOKENS, return_tensors="pt").input_ids
        chunks.append(graph(ids)[0].half())
    return torch.cat(chunks)


def alphas_cumprod() -> torch.Tensor:
    c = SCHEDULER_CONFIG
    betas = torch.linspace(c["beta_start"], c["beta_end"], c["num_train_timesteps"], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> the UNet's input layout: [-1, 1], space-to-depth."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    return F.pixel_unshuffle(x, PATCH)


def learning_rate(peak: float, step: int, steps: int, warmup: int, cooldown: int = 0) -> float:
    """Linear warm-up over the first ``warmup`` steps, then ``peak``; with ``cooldown`` > 0 the last
    ``cooldown`` of the stage's ``steps`` decay it linearly towards zero."""
    lr = peak * min(1.0, (step + 1) / warmup)
    if cooldown > 0:
        lr *= min(1.0, (steps - step) / cooldown)
    return lr


def loss_weight(alpha_bar: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
    """Per-example weight of the v-prediction loss.

    ``min_snr_gamma`` > 0: min-SNR-γ (Hang et al. 2023), ``min(snr, γ) / (snr + 1)``; on the x0 error
    that is ``min(snr, γ)``, so high noise (snr << 1, where the layout is decided) weighs almost
    nothing. 0: the plain v loss, ``snr + 1`` on the x0 error (Salimans & Ho 2022), at least 1 everywhere.
    """
    if min_snr_gamma <= 0:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=min_snr_gamma) / (snr + 1)


class Trainer:
    """One stage: v-prediction (loss weights: :func:`loss_weight`), caption dropout, EMA weights."""

    def __init__(self, args: argparse.Namespace, data: dict[str, torch.Tensor], stage: Stage,
                 init: dict[str, torch.Tensor] | None, text_head: bool = False) -> None:
        self.args, self.data, self.stage = args, data, stage
        stage_seed = args.seed * 1000 + zlib.crc32(stage.name.encode()) % 1000
        torch.manual_seed(stage_seed)
        self.model = UNet2DConditionModel(**args.unet_config)
        if init is not None:
            self.model.load_state_dict(init)
        self.model.to(args.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=stage.lr, weight_decay=0.0)
        self.head = TextHead(data["states"].shape[-1], MAX_TOKENS).to(args.device) if text_head else None
        direction = torch.randn(data["states"].shape[-1], generator=torch.Generator().manual_seed(args.seed))
        self.role_direction = (direction / direction.norm()).to(args.device)
        self.step = 0
        self.role_values: list[float] = []  # the head's role loss since the last log line
        self.generator = torch.Generator().manual_seed(stage_seed + 1)
        self.ab = alphas_cumprod()
        self.path = args.out / f"{stage.name}.pt"
        state = torch.load(self.path, map_location=args.device) if self.path.is_file() else {}
        if "head" in state and self.head is None:
            raise SystemExit(f"{self.path} was trained with a text head: pass --text-head")
        if state:
            self.model.load_state_dict(state["model"])
            self.step = state["step"]
            self.generator.set_state(state["generator"])
        if self.head is not None:
            if "head" in state:
                self.head.load_state_dict(state["head"])
            elif state:  # a head added to a trained UNet: keep the UNet's optimizer state, the head starts fresh
                self.optimizer.load_state_dict(state.pop("optimizer"))
            self.optimizer.add_param_group({"params": list(self.head.parameters())})
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.ema = state.get("ema") or {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.head_ema = state.get("head_ema") or (
            {k: v.detach().clone() for k, v in self.head.state_dict().items()} if self.head is not None else {})
        if state:
            log.info("%s: resumed at step %d%s", stage.name, self.step,
                     ", adding a text head" if self.head is not None and "head" not in state else "")

    def save(self) -> None:
        state = {"model": self.model.state_dict(), "ema": self.ema, "optimizer": self.optimizer.state_dict(),
                 "generator": self.generator.get_state(), "step": self.step}
        if self.head is not None:
            state.update(head=self.head.state_dict(), head_ema=self.head_ema)
        write_atomic(self.path, lambda p: torch.save(state, p))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g, n = self.generator, self.data["images"].shape[0]
        rows = torch.randint(0, n, (self.args.batch,), generator=g)
        x0 = to_model_space(self.data["images"][rows])
        captions = self.data["caption_index"][rows]
        drop = torch.rand(self.args.batch, generator=g) < self.args.caption_dropout
        captions = torch.where(drop, 0, captions)
        states = self.data["states"][captions].float()
        lo, hi = self.stage.t_range
        t = torch.randint(lo, hi, (self.args.batch,), generator=g)
        return x0, states, t, captions

    def role_loss(self, states: torch.Tensor, out: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Auxiliary loss of the text head: along a fixed direction, its residual on each token is
        ``ROLE_SCALE`` times the token's side (left/top object +1, the other -1; other tokens free)."""
        sides = self.data["sides"][captions].to(out.device, out.dtype)
        along = (out - states) @ self.role_direction
        labelled = sides != 0
        if not labelled.any():
            return out.new_zeros(())
        return (along - ROLE_SCALE * sides)[labelled].pow(2).mean()

    def train_step(self) -> float:
        x0, states, t, captions = self.batch()
        noise = torch.randn(x0.shape, generator=self.generator)  # drawn on the CPU: same on any device
        ab = self.ab[t].view(-1, 1, 1, 1)
        x0, states, t, noise, ab = (v.to(self.args.device) for v in (x0, states, t, noise, ab))
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        lr = learning_rate(self.stage.lr, self.step, self.stage.steps, self.args.warmup, self.args.cooldown)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        role = None
        if self.head is not None:
            text = states
            states = self.head(states)
            if self.args.role_loss > 0:
                role = self.role_loss(text, states, captions)
        pred = self.model(xt, t, encoder_hidden_states=states).sample
        target = ab.sqrt() * noise - (1 - ab).sqrt() * x0  # v
        weight = loss_weight(ab.view(-1), self.args.min_snr_gamma)
        loss = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        self.optimizer.zero_grad(set_to_none=True)
        if role is not None:
            self.role_values.append(role.item())
        (loss if role is None else loss + self.args.role_loss * role).backward()
        for group in self.optimizer.param_groups:  # the UNet's and the head's norms apart
            torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
        self.optimizer.step()
        self.update_ema()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.args.ema, (1 + self.step) / (10 + self.step))
        pairs = [(self.model, self.ema)] + ([(self.head, self.head_ema)] if self.head is not None else [])
        for module, ema in pairs:
            for k, v in module.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v, alpha=1 - decay)
                else:
                    ema[k].copy_(v)

    def run(self) -> dict[str, torch.Tensor]:
        self.model.train()
        started, losses = time.perf_counter(), []
        first = self.step
        while self.step < self.stage.steps:
            losses.append(self.train_step())
            if self.step % self.args.log_every == 0:
                rate = (self.step - first) / (time.perf_counter() - started)
                eta = (self.stage.steps - self.step) / rate
                role = f" role {np.mean(self.role_values):.3f}" if self.role_values else ""
                log.info("%s step %d/%d loss %.4f%s (%.2f it/s, eta %.0f min)", self.stage.name, self.step,
                         self.stage.steps, float(np.mean(losses)), role, rate, eta / 60)
                losses, self.role_values = [], []
            if self.step % self.args.checkpoint_every == 0 or self.step == self.stage.steps:
                self.save()
        return self.ema


def save_weights(ema: dict[str, torch.Tensor], folder: Path, config: dict) -> None:
    model = UNet2DConditionModel(**config)
    model.load_state_dict({k: v.cpu() for k, v in ema.items()})
    model.half().save_pretrained(folder, safe_serialization=True)


@torch.no_grad()
def through_head(head: TextHead, states: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """The cached token states passed through the (frozen) text head, as the exported text encoder gives them."""
    head = head.float().eval()
    return torch.cat([head(states[i:i + batch].float()).half() for i in range(0, len(states), batch)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working directory (checkpoints, data, weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=60000, help="training examples rendered (default 60000)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--base-steps", type=int, default=8500)
    p.add_argument("--expert-steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=5e-4, help="base learning rate (experts use 0.4x)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--cooldown", type=int, default=0, help="decay the learning rate linearly to zero over "
                   "the last N steps of every stage trained in this run (default 0: constant)")
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="min-SNR loss weights with this γ "
                   "(default 5); 0: the unweighted v-prediction loss")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--composition-floor", type=int, default=200, help="composition expert trains on t >= this")
    p.add_argument("--detail-ceiling", type=int, default=500, help="detail expert trains on t < this")
    p.add_argument("--experts", nargs="*", choices=("composition", "detail"), default=["composition", "detail"],
                   help="expert stages to run after the base (run one per process to use two cores); "
                   "none (a bare --experts): the base only")
    p.add_argument("--unet-config", type=json.loads, default={}, metavar="JSON",
                   help="UNet settings that replace the shipped ones (artrt.export.shapes_demo.UNET_CONFIG), e.g. "
                   "'{\"layers_per_block\": 2}'; a resumed run must pass the same")
    p.add_argument("--text-head", action="store_true", help="train a text head (artrt.demo.text_head) with "
                   "the base, frozen for the experts; a base checkpoint without one gets a fresh head")
    p.add_argument("--role-loss", type=float, default=0.0, help="weight of the text head's auxiliary loss: "
                   "write each token's side (artrt.demo.captions.word_sides) into its state (default 0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--init", type=Path, help="start the base from these weights (a diffusers UNet folder, e.g. "
                   "demo/weights/composition) instead of a random init: to continue training the shipped model")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=200)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.unet_config = {**UNET_CONFIG, **args.unet_config}
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_data(args.out, args.examples, args.seed)
    T = SCHEDULER_CONFIG["num_train_timesteps"]
    init = None
    if args.init is not None:
        init = UNet2DConditionModel.from_pretrained(args.init).float().state_dict()
    trainer = Trainer(args, data, Stage("base", args.base_steps, args.lr, (0, T)), init, args.text_head)
    base = trainer.run()
    save_weights(base, args.out / "weights" / "base", args.unet_config)
    if trainer.head is not None:
        head = TextHead(**trainer.head.config)
        head.load_state_dict({k: v.cpu() for k, v in trainer.head_ema.items()})
        head.save(args.out / "weights" / "text_head")
        data = {**data, "states": through_head(head, data["states"])}
    experts = {
        "composition": Stage("composition", args.expert_steps, 0.4 * args.lr, (args.composition_floor, T)),
        "detail": Stage("detail", args.expert_steps, 0.4 * args.lr, (0, args.detail_ceiling)),
    }
    for name in args.experts:
        save_weights(Trainer(args, data, experts[name], base).run(), args.out / "weights" / name, args.unet_config)
    facts = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "weights" / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    log.info("weights written to %s", args.out / "weights")


if __name__ == "__main__":
    main()
