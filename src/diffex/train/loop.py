"""The one training loop shared by every stage: seeded batches, AdamW, warm-up + cosine LR,
gradient clipping, EMA with warm-up, optional bf16 autocast, periodic evaluation with best-model
selection and early stopping, progress bar."""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from diffex.errors import DiffexError, brief
from diffex.log import info, progress_bar
from diffex.runtime import speed_on
from diffex.train.distributed import (
    average_buffers,
    average_gradients,
    barrier,
    batch_len,
    is_main,
    rank,
    shard,
    world_size,
)
from diffex.train.resume import Resume, load_state, restore, save_state


@dataclass
class LoopConfig:
    """Optimisation settings of one training stage."""

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" or "constant" after warm-up
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.0  # 0 disables EMA
    eval_every: int = 0  # 0: evaluate only at the end (when an evaluator is given)
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    log_every: int = 50
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    accumulate: int = 1  # micro-batches per optimiser step (same global batch, less memory)
    compile: bool | None = None  # torch.compile the submodules; None: on CUDA only
    channels_last: bool | None = None  # NHWC weights for convolutions; None: automatic

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise DiffexError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise DiffexError(f"learning rate must be > 0, got {self.lr}")
        if self.schedule not in {"cosine", "constant"}:
            raise DiffexError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if not 0 <= self.ema_decay < 1:
            raise DiffexError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.precision not in {"fp32", "bf16"}:
            raise DiffexError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.accumulate < 1:
            raise DiffexError(f"accumulate must be >= 1, got {self.accumulate}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EpochSampler:
    """Endless seeded index batches: a fresh permutation per epoch, last partial batch dropped."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise DiffexError("no training images")
        self.n, self.batch_size = n, min(batch_size, n)
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            perm = torch.randperm(self.n, generator=self.generator)
            for i in range(0, self.n - self.batch_size + 1, self.batch_size):
                yield perm[i : i + self.batch_size]


class EMA:
    """Exponential moving average of a module's weights, with the usual warm-up
    ``decay_t = min(decay, (1 + t) / (10 + t))`` so early averages forget the random init."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = dict(self.module.named_parameters())
        for name, p in module.named_parameters():
            ema_params[name].lerp_(p.detach(), 1.0 - d)
        ema_bufs = dict(self.module.named_buffers())
        for name, b in module.named_buffers():
            ema_bufs[name].copy_(b)


@dataclass
class LoopResult:
    """What a training run produced: per-step losses, evaluations and the chosen model."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then constant or cosine decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    )


def compile_submodules(module: nn.Module) -> list[nn.Module]:
    """``torch.compile`` every direct child with parameters, in place (state_dict keys keep
    their names, and methods other than ``forward``, e.g. ``training_loss``, still use them)."""
    # A batch of another size (an epoch's last, an evaluation's) recompiles with dynamic shapes;
    # torch's symbolic-shape reasoning then logs dozens of harmless "failed while executing
    # pow_by_natural" warnings per stage (seen on an H200), which would bury the progress lines.
    logging.getLogger("torch.utils._sympy.interp").setLevel(logging.ERROR)
    done = []
    for child in module.children():
        if any(True for _ in child.parameters()):
            child.compile()
            done.append(child)
    return done


def _compile_error(exc: Exception) -> bool:
    """True for errors raised by torch.compile's machinery (dynamo, inductor, AOT autograd)."""
    mod = type(exc).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "torch._functorch"))


def uncompile(modules: list[nn.Module], exc: Exception, desc: str) -> list[nn.Module]:
    """Turn compilation off again after it failed, with a warning saying why."""
    from diffex.log import warn

    for m in modules:
        m._compiled_call_impl = None  # what nn.Module.compile sets; None means eager
    warn(f"{desc}: torch.compile failed ({brief(exc, 160)}); training without it (--no-compile)")
    return []


def run_loop(
    module: nn.Module,
    loss_fn: Callable[[nn.Module, Any, int], dict[str, torch.Tensor]],
    batches: Iterator[Any],
    cfg: LoopConfig,
    device: torch.device,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    score_key: str | None = None,
    maximize: bool = True,
    callbacks: list[Callable[[int, nn.Module], None]] | None = None,
    desc: str = "training",
    resume: Resume | None = None,
) -> LoopResult:
    """Train ``module`` for ``cfg.steps`` steps of ``loss_fn(module, batch, step)['loss']``.

    ``evaluate(model)`` runs every ``cfg.eval_every`` steps (and at the end) on the EMA model when
    EMA is on; with ``score_key`` the best evaluated weights are kept and restored at the end,
    and ``cfg.patience`` stops early. ``callbacks(step, model)`` run at the same points
    (every ``cfg.eval_every`` steps and at the end), e.g. to write sample grids.
    With ``resume`` the whole training state is saved every ``resume.every`` steps and at the
    end, and a matching checkpoint found at start is continued from (batches already used are
    skipped, RNGs restored), so an interrupted run ends with the same weights as an
    uninterrupted one. Returns the final (best or EMA) model.
    """
    cuda = device.type == "cuda"
    if speed_on("channels_last", device, cfg.channels_last):
        module.to(memory_format=torch.channels_last)
    world, me = world_size(), rank()
    params = [p for p in module.parameters() if p.requires_grad]
    fused = cuda
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, fused=fused
    )
    ema = EMA(module, cfg.ema_decay) if cfg.ema_decay > 0 else None
    # compiled after the EMA copy is made: a copy of a compiled module would still call the
    # original's forward; the EMA model (used for evaluation) stays eager
    compiled = compile_submodules(module) if speed_on("compile", device, cfg.compile) else []
    result = LoopResult(model=module)
    best_score, best_state, since_best = -math.inf, None, 0
    eval_every = cfg.eval_every or cfg.steps
    use_bf16 = cfg.precision == "bf16"
    running: dict[str, float] = {}
    start = time.perf_counter()
    interactive = sys.stderr.isatty()
    start_step, done, elapsed = 0, False, 0.0
    loaded = load_state(resume) if resume is not None else None
    if loaded is not None and resume is not None:
        best_state = restore(loaded, resume, module, ema.module if ema else None, opt)
        st = loaded.state
        start_step, elapsed = loaded.step, float(st.get("seconds", 0.0))
        result.history, result.evals = list(st["history"]), list(st["evals"])
        result.best_step, result.stopped_early = st.get("best_step"), bool(st["stopped_early"])
        best_score = -math.inf if st.get("best_score") is None else float(st["best_score"])
        since_best = int(st.get("since_best", 0))
        if ema is not None:
            ema.updates = int(st.get("ema_updates", 0))
        done = result.stopped_early or start_step >= cfg.steps
        info(f"{desc}: resuming from step {start_step} ({resume.path})")
        for _ in range(start_step):  # replay the data order up to the checkpoint
            next(batches)

    def checkpoint(step: int) -> None:
        if resume is None:
            return
        if not is_main():
            barrier(device)  # rank 0 writes; the others wait for the file
            return
        save_state(
            resume,
            step=step,
            module=module,
            ema=ema.module if ema is not None else None,
            optimizer=opt,
            best=best_state,
            state={
                "history": result.history,
                "evals": result.evals,
                "best_step": result.best_step,
                "best_score": None if best_score == -math.inf else best_score,
                "since_best": since_best,
                "stopped_early": result.stopped_early,
                "ema_updates": ema.updates if ema is not None else 0,
                "seconds": elapsed + time.perf_counter() - start,
            },
        )
        barrier(device)

    module.train()
    with progress_bar() as bar:
        task = bar.add_task(desc, total=cfg.steps, status="", completed=start_step)
        for step in range(start_step, cfg.steps if not done else start_step):
            batch = next(batches)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            local = shard(batch, me, world)
            parts = min(cfg.accumulate, batch_len(local))

            def forward_backward(step: int = step, local: Any = local, parts: int = parts):
                """Gradients of the step's loss over its micro-batches; the mean losses."""
                opt.zero_grad(set_to_none=True)
                totals: dict[str, float] = {}
                for part in range(parts):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        losses = loss_fn(module, shard(local, part, parts), step)
                    loss = losses["loss"]
                    if not torch.isfinite(loss):
                        kept = (
                            f"; the last good checkpoint is kept in {resume.path}"
                            if resume is not None and resume.path.is_file()
                            else ""
                        )
                        raise DiffexError(
                            f"{desc}: loss became {loss.item()} at step {step + 1}{kept}; "
                            "try a lower learning rate, or fp32 instead of bf16"
                        )
                    (loss / parts if parts > 1 else loss).backward()
                    for k, v in losses.items():
                        totals[k] = totals.get(k, 0.0) + float(v.detach()) / parts
                return totals

            try:
                totals = forward_backward()
            except DiffexError:
                raise
            except Exception as exc:
                if not compiled or not (step == start_step or _compile_error(exc)):
                    raise
                compiled = uncompile(compiled, exc, desc)  # fall back to eager, redo the step
                totals = forward_backward()
            average_gradients(params, device)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            average_buffers(module, device)
            if ema is not None:
                ema.update(module)
            record = dict(totals)
            record["step"] = step + 1
            record["lr"] = opt.param_groups[0]["lr"]
            result.history.append(record)
            for k, v in record.items():
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            bar.update(task, advance=1, status=f"loss {running['loss']:.4f}")
            if not interactive and ((step + 1) % cfg.log_every == 0 or step == 0):
                info(f"{desc}: step {step + 1}/{cfg.steps} loss {running['loss']:.4f}")
            last = step + 1 == cfg.steps
            due = (step + 1) % eval_every == 0 or last
            if due and callbacks and is_main():
                model = ema.module if ema is not None else module
                for cb in callbacks:
                    cb(step + 1, model)
                module.train()
            if evaluate is not None and due:
                model = ema.module if ema is not None else module
                model.eval()
                try:
                    metrics = {"step": step + 1, **evaluate(model)}
                except Exception as exc:
                    if not compiled or not _compile_error(exc):
                        raise
                    compiled = uncompile(compiled, exc, desc)
                    metrics = {"step": step + 1, **evaluate(model)}
                module.train()
                result.evals.append(metrics)
                if score_key is not None:
                    score = metrics[score_key] if maximize else -metrics[score_key]
                    if score > best_score:
                        best_score, since_best = score, 0
                        best_state = copy.deepcopy(model.state_dict())
                        result.best_step = step + 1
                    else:
                        since_best += 1
                        if cfg.patience and since_best >= cfg.patience and not last:
                            result.stopped_early = True
                            info(f"{desc}: early stop at step {step + 1} (best {result.best_step})")
                            checkpoint(step + 1)
                            break
            if resume is not None and ((step + 1) % resume.every == 0 or last):
                checkpoint(step + 1)
    for m in compiled:  # hand back a plain module: later inference sees other shapes
        m._compiled_call_impl = None
    final = ema.module if ema is not None else module
    if best_state is not None:
        final.load_state_dict(best_state)
    final.eval()
    result.model = final
    result.seconds = elapsed + time.perf_counter() - start
    return result
