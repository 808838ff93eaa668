"""Train the demo digits flow model and write the checkpoint + manifest.

Usage::

    python -m svdq_compile.demo.train --steps 1240 --seed 0 --threads 1 \\
        --out svdq_compile/demo/assets/digits_flow.safetensors

(the defaults; this reproduces the committed checkpoint, ~11 min on a busy 2-core CPU).

Writes the EMA weights as safetensors and a JSON manifest next to it (same
stem, ``.json``) recording how the checkpoint was made and how good it is.

``--max-minutes`` is a safety cap for shared machines: training stops early
once it is exceeded. Nothing in the recipe depends on the *total* step count
(constant learning rate, EMA warm-up keyed on the current step), so a run cut
at step ``k`` is bit-identical to ``--steps k`` with the same seed and thread
count; the manifest records ``k`` and that exact reproduction command.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from svdq_compile.demo import classifier
from svdq_compile.demo.data import DEFAULT_SEED, load_digits_split
from svdq_compile.demo.model import CHECKPOINT_PATH, NULL_LABEL, DemoConfig, DigitFlow, build_model, patchify
from svdq_compile.demo.sampler import sample

__all__ = ["TrainConfig", "TrainResult", "evaluate", "save_checkpoint", "train", "main"]

log = logging.getLogger(__name__)

#: Checkpoints must stay small enough to commit to git.
MAX_CHECKPOINT_BYTES = 10_000_000


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults are the ones used for the committed checkpoint)."""

    steps: int = 1240  # the committed checkpoint: what an 11-minute cap reached on a shared 2-core CPU
    seed: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW default
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # fraction of labels replaced by NULL_LABEL, enables CFG
    # One intra-op thread: on a shared 2-core machine two OpenMP threads slow
    # down 2-10x as soon as another process competes for a core (measured),
    # while one thread is only ~1.7x slower than two on an idle machine.
    threads: int = 1
    max_seconds: float | None = None  # stop early past this wall time (see module docstring)
    log_every: int = 100


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    ema: DigitFlow
    model: DigitFlow
    wall_s: float
    steps: int  # steps actually run (< requested if max_seconds cut training short)
    final_loss: float  # mean loss over the last ``log_every`` steps
    loss_history: list[tuple[int, float]] = field(default_factory=list)


def _ema_update(ema: DigitFlow, model: DigitFlow, decay: float, step: int) -> None:
    """``ema <- d * ema + (1 - d) * model`` with a warm-up on ``d``.

    Without the warm-up (``d = min(decay, (1 + step) / (10 + step))``) a 0.999 EMA
    over a few thousand steps would still carry ~10% of the random init.
    """
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p, 1.0 - d)


def train(tcfg: TrainConfig = TrainConfig(), cfg: DemoConfig = DemoConfig(), progress: bool = True) -> TrainResult:
    """Train :class:`DigitFlow` with rectified flow on the digits train split (CPU, deterministic)."""
    torch.set_num_threads(tcfg.threads)  # results depend on the thread count: pin it
    # Deterministic kernels, but without NaN-filling every torch.empty (the
    # default in deterministic mode), which made CPU training ~3x slower.
    prev = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        return _train(tcfg, cfg, progress)
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.utils.deterministic.fill_uninitialized_memory = prev[1]


def _train(tcfg: TrainConfig, cfg: DemoConfig, progress: bool) -> TrainResult:
    """The training loop proper; :func:`train` wraps it in the determinism settings."""
    torch.manual_seed(tcfg.seed)
    gen = torch.Generator().manual_seed(tcfg.seed)  # drives batches, noise, t and label dropout

    split = load_digits_split(DEFAULT_SEED)
    data = patchify(split.train_images, cfg.patch)  # [N, 16, 4]
    targets = split.train_labels  # [N]
    n = len(targets)

    model = build_model(cfg, seed=tcfg.seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    log.info(
        "training %d params for %d steps on %d images (batch %d)",
        sum(p.numel() for p in model.parameters()), tcfg.steps, n, tcfg.batch_size,
    )

    perm = torch.randperm(n, generator=gen)
    cursor = 0
    window: list[float] = []
    history: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, tcfg.steps + 1), desc="train", disable=not progress)
    for step in bar:
        # Epoch-wise shuffling so every image is seen once per epoch.
        if cursor + tcfg.batch_size > n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor : cursor + tcfg.batch_size]
        cursor += tcfg.batch_size

        x0 = data[idx]  # [B, 16, 4]
        labels = targets[idx].clone()  # [B]
        drop = torch.rand(labels.shape, generator=gen) < tcfg.label_dropout
        labels[drop] = NULL_LABEL
        eps = torch.randn(x0.shape, generator=gen)  # [B, 16, 4]
        t = torch.rand(labels.shape, generator=gen)  # [B], uniform in [0, 1)
        xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps  # [B, 16, 4]

        loss = F.mse_loss(model(xt, t, labels), eps - x0)  # target velocity v = eps - x0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        _ema_update(ema, model, tcfg.ema_decay, step)

        window.append(loss.item())
        elapsed = time.perf_counter() - t0
        out_of_time = tcfg.max_seconds is not None and elapsed > tcfg.max_seconds
        if step % tcfg.log_every == 0 or step == tcfg.steps or out_of_time:
            mean = sum(window) / len(window)
            history.append((step, mean))
            bar.set_postfix(loss=f"{mean:.4f}")
            log.info("step %d/%d loss %.4f (%.1fs)", step, tcfg.steps, mean, elapsed)
            window = []
        if out_of_time:
            log.warning("time cap of %.0fs reached: stopping at step %d of %d", tcfg.max_seconds, step, tcfg.steps)
            break
    bar.close()
    wall = time.perf_counter() - t0
    return TrainResult(
        ema=ema, model=model, wall_s=wall, steps=step, final_loss=history[-1][1], loss_history=history
    )


def evaluate(
    model: DigitFlow,
    per_class: int = 50,
    steps: int = 20,
    guidance: float = 1.5,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Classifier accuracy on ``10 * per_class`` samples (labels 0..9 repeated)."""
    labels = torch.arange(10).repeat(per_class)  # [10 * per_class]
    images = sample(model, labels, steps=steps, guidance=guidance, seed=seed, progress=progress)
    return classifier.accuracy(images, labels)


def save_checkpoint(model: DigitFlow, path: Path, metadata: dict[str, str]) -> str:
    """Save weights as fp32 safetensors, or fp16 if fp32 would exceed the size cap; returns the dtype used."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    dtype = torch.float32 if nbytes < MAX_CHECKPOINT_BYTES - 100_000 else torch.float16  # 100 kB header slack
    state = {k: v.to(dtype) for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return str(dtype).removeprefix("torch.")


def _versions() -> dict[str, str]:
    import diffusers
    import numpy
    import safetensors
    import sklearn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--out", type=Path, default=CHECKPOINT_PATH)
    p.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch intra-op threads")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early past this wall time")
    p.add_argument("--eval-per-class", type=int, default=50, help="samples per digit for the final accuracy")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = DemoConfig()
    max_seconds = None if args.max_minutes is None else 60.0 * args.max_minutes
    tcfg = TrainConfig(steps=args.steps, seed=args.seed, threads=args.threads, max_seconds=max_seconds)
    result = train(tcfg, cfg, progress=not args.no_progress)
    log.info("trained %d steps in %.1fs, final loss %.4f", result.steps, result.wall_s, result.final_loss)

    # Final quality: classifier accuracy on generated digits, 20 Euler steps.
    eval_steps = 20
    sample_acc = {}
    for g in (1.0, 1.5):
        sample_acc[f"guidance_{g}"] = evaluate(result.ema, args.eval_per_class, eval_steps, g, seed=0)
        log.info("sample accuracy (guidance %.1f): %.4f", g, sample_acc[f"guidance_{g}"])
    # Time the standard "100 images x 20 steps" workload with the EMA model.
    labels = torch.arange(10).repeat(10)  # [100]
    t0 = time.perf_counter()
    sample(result.ema, labels, steps=eval_steps, guidance=1.5, seed=1, progress=False)
    sample_s = time.perf_counter() - t0

    command = "python -m svdq_compile.demo.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    reproduce = (
        f"python -m svdq_compile.demo.train --steps {result.steps} --seed {tcfg.seed} "
        f"--threads {tcfg.threads} --out {shlex.quote(str(args.out))}"
    )
    meta = {"config": json.dumps(cfg.to_dict()), "steps": str(result.steps), "seed": str(tcfg.seed)}
    dtype = save_checkpoint(result.ema, args.out, meta)
    blob = args.out.read_bytes()
    manifest = {
        "command": command,
        "reproduce_command": reproduce,
        "checkpoint": args.out.name,
        "checkpoint_bytes": len(blob),
        "checkpoint_sha256": hashlib.sha256(blob).hexdigest(),
        "weights": "EMA",
        "dtype": dtype,
        "num_params": sum(p.numel() for p in result.ema.parameters()),
        "seed": tcfg.seed,
        "steps": result.steps,
        "steps_requested": tcfg.steps,
        "train_wall_s": round(result.wall_s, 1),
        "torch_threads": tcfg.threads,
        "final_loss": round(result.final_loss, 5),
        "loss_history": {str(s): round(v, 5) for s, v in result.loss_history},
        "train_config": {k: v for k, v in vars(tcfg).items()},
        "objective": "rectified flow: x_t = (1 - t) x0 + t eps, t ~ U(0, 1), target v = eps - x0",
        "dataset": load_digits_split(DEFAULT_SEED).describe(),
        "config": cfg.to_dict(),
        "versions": _versions(),
        "eval": {
            "sampler": "Euler, t 1 -> 0, CFG v = v_u + g (v_c - v_u) batched as 2B",
            "sampling_steps": eval_steps,
            "num_samples": 10 * args.eval_per_class,
            "noise_seed": 0,
            "classifier": "sklearn SVC(C=10) on 64 pixels, fitted on the real train split",
            "classifier_heldout_accuracy": round(classifier.heldout_accuracy(), 4),
            "sample_accuracy": {k: round(v, 4) for k, v in sample_acc.items()},
            "sample_100x20_wall_s": round(sample_s, 2),
        },
    }
    args.out.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: manifest[k] for k in ("steps", "train_wall_s", "checkpoint_bytes", "eval")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
