"""The training loop and evaluation: read it top to bottom.

Data order is a function of (seed, epoch) and the *global* batch, never of the world size: each
step takes the next `global_batch` indices of the epoch's permutation, and rank r's k-th
micro-batch is slice (k * world + r) of it. So a 2-rank run and a 1-rank run with the same global
batch see the same examples per optimizer step, and their losses agree.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import flops, metrics, verbalizer
from .collate import collate, shard_batches
from .engine import BatchSizes
from .preemption import Preemption
from .prompt import read_state, write_state
from .tracking import COLLAPSE_SHARE, Table, Tracker, collapsed, memory_mb, norm_guard, stability


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int
    eval_steps: frozenset[int]

    @staticmethod
    def build(n_train: int, global_batch: int, max_steps: int, epochs: float, eval_every: int) -> "Schedule":
        steps_per_epoch = n_train // global_batch  # drop the last partial global batch
        if steps_per_epoch == 0:
            raise ValueError(f"the training split ({n_train} examples) is smaller than one global batch ({global_batch})")
        total = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
        every = eval_every or steps_per_epoch
        return Schedule(steps_per_epoch, total, frozenset(range(every, total + 1, every)) | {total})


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def micro_batches(order: list[int], step_in_epoch: int, sizes: BatchSizes, rank: int) -> list[list[int]]:
    """This rank's micro-batches (grad_accum of them) for one optimizer step."""
    start = step_in_epoch * sizes.global_batch
    step_idx = order[start:start + sizes.global_batch]
    m = sizes.micro_batch
    return [step_idx[(k * sizes.world_size + rank) * m:][:m] for k in range(sizes.grad_accum)]


def rows(split, idx: list[int]) -> list[dict]:
    part = split[idx]  # a dict of columns
    return [{"input_ids": ids, "label": lab} for ids, lab in zip(part["input_ids"], part["label"])]


@torch.no_grad()
def evaluate(engine, split, label_names: list[str], batch_size: int, pad_id: int, rank: int, world: int,
             device) -> dict:
    """Metrics over `split`, every example counted exactly once across ranks.

    Each rank scores a contiguous shard (`shard_batches`: filler rows, not duplicated examples).
    """
    engine.eval()
    cm = torch.zeros(len(label_names), len(label_names), dtype=torch.long)
    for idx in shard_batches(len(split), batch_size, rank, world):
        batch = collate(rows(split, idx or [0]), pad_id).to(device)
        scores = engine(batch.input_ids, batch.attention_mask)
        if idx:
            cm += metrics.confusion(batch.labels.cpu(), verbalizer.predict(scores).cpu(), len(label_names))
    engine.train()
    return metrics.from_confusion(metrics.all_reduce_sum(cm), label_names)


def flat(prefix: str, m: dict) -> dict:
    """Eval metrics as metrics.jsonl / W&B keys: eval/accuracy, eval/f1/<label>, ..."""
    out = {f"{prefix}/accuracy": m["accuracy"], f"{prefix}/macro_f1": m["macro_f1"]}
    out.update({f"{prefix}/f1/{k}": v for k, v in m["f1"].items()})
    out.update({f"{prefix}/pred_count/{k}": v for k, v in m["pred_counts"].items()})
    # Row i = true label i, column j = predicted label j.
    out[f"{prefix}/confusion"] = Table(columns=list(m["pred_counts"]), data=m["confusion"])
    out[f"{prefix}/collapsed"] = collapsed(m["pred_counts"])
    return out


def prompt_norm(prompt) -> float:
    """L2 norm of the prompt the model sees (reparameterization and clipping applied). Collective."""
    return prompt.export(read_state(prompt)).norm().item()


def train(engine, splits, sizes: BatchSizes, schedule: Schedule, cfg, tracker: Tracker, pad_id: int,
          rank: int, device, state: dict | None = None, save: Callable[[int, dict], None] | None = None,
          preemption: Preemption | None = None, class_weights: list[float] | None = None) -> dict:
    """Train, evaluate on dev per `schedule`, then score the best-dev prompt on test.

    With --tune full there is no prompt to keep: test is scored at every dev evaluation instead,
    and the best dev step's is reported. `state` is a checkpoint's trainer state to continue from;
    `save(step, state)` writes one (every --save_every steps, and when a preemption is requested:
    then the run returns early with `preempted` set). `class_weights` (per class) weight the loss;
    --select_metric names the dev metric that picks the best step.
    """
    prompt = engine.module.prompt  # None: full fine-tuning without a prompt
    keep_prompt = cfg.model.tune == "prompt"
    n_prompt = prompt.n_tokens if prompt is not None else 0
    labels = splits.label_names
    best = {"step": 0, "metrics": None, "state": None, "test": None}
    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights else None
    select = cfg.train.select_metric
    window = torch.zeros(3, dtype=torch.float64)  # loss x examples, examples, tokens since last log
    # Stability guards: dev evals whose predictions collapsed onto one class, and the prompt norm
    # against its initial value (a runaway norm preceded the collapse of published mT5 runs).
    guards = {"collapsed_steps": [], "runaway_step": None, "init_norm": prompt_norm(prompt) if prompt is not None else None}
    start = 0
    if state is not None:  # the data position follows from the step: order = f(seed, epoch)
        start, best, window, guards = state["step"], state["best"], state["window"], state["guards"]
    # The restored window's examples were processed in the interrupted run's time, not ours.
    t_log = time.perf_counter() - (state["window_s"] if state else 0.0)
    engine.train()

    for step in range(start + 1, schedule.total_steps + 1):
        epoch, step_in_epoch = divmod(step - 1, schedule.steps_per_epoch)
        if step_in_epoch == 0 or step == start + 1:
            order = epoch_order(len(splits.train), cfg.train.seed, epoch)
        for idx in micro_batches(order, step_in_epoch, sizes, rank):
            batch = collate(rows(splits.train, idx), pad_id).to(device)
            scores = engine(batch.input_ids, batch.attention_mask)  # (B, C)
            loss = verbalizer.loss(scores, batch.labels, weight)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            B = len(batch)
            window += torch.tensor([loss.item() * B, B, batch.attention_mask.sum().item() + n_prompt * B])

        if step % cfg.train.log_every == 0 or step == schedule.total_steps:
            loss_sum, n_ex, n_tok = metrics.all_reduce_sum(window).tolist()
            elapsed = time.perf_counter() - t_log
            record = {
                "train/loss": loss_sum / n_ex,
                "train/lr": engine.get_lr()[0],
                "train/epoch": step / schedule.steps_per_epoch,
                "train/tokens_per_s": n_tok / elapsed,
                "train/samples_per_s": n_ex / elapsed,
                "train/step_time_s": elapsed * sizes.global_batch / n_ex,  # each step takes one global batch
                **memory_mb(device),
            }
            if prompt is not None:
                record.update(norm_guard(prompt_norm(prompt), guards["init_norm"]))  # collective
                if record["train/runaway"] and guards["runaway_step"] is None:
                    guards["runaway_step"] = step
                    tracker.print(f"warning: step {step}: the prompt norm is {record['train/prompt_norm_ratio']:.1f}x "
                                  "its initial value (runaway; consider a lower lr, --prompt_max_norm or --prompt_init "
                                  "vocab|labels)")
            # The last step's, before clipping; DeepSpeed has none at ZeRO stage 0 without clipping.
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                record["train/grad_norm"] = float(grad_norm)
            if cfg.train.peak_tflops:
                window_flops = flops.train_flops(engine.module.mt5.config, n_ex, n_tok / n_ex)
                record["train/mfu"] = flops.mfu(window_flops, elapsed, cfg.train.peak_tflops,
                                                sizes.world_size)
            tracker.log(step, record)
            window.zero_()
            t_log = time.perf_counter()
            tracker.advance(loss=record["train/loss"], tok_s=record["train/tokens_per_s"])
        else:
            tracker.advance()

        if step in schedule.eval_steps:
            t_eval = time.perf_counter()
            dev = evaluate(engine, splits.dev, labels, cfg.train.eval_batch_size, pad_id, rank,
                           sizes.world_size, device)
            record = flat("eval", dev)
            tracker.log(step, record)
            tracker.print(f"step {step}: dev accuracy {dev['accuracy']:.4f} macro-F1 {dev['macro_f1']:.4f}")
            if record["eval/collapsed"]:
                guards["collapsed_steps"].append(step)
                tracker.print(f"warning: step {step}: {COLLAPSE_SHARE:.0%} or more of the dev predictions "
                              f"are one class {dev['pred_counts']}")
            if best["metrics"] is None or dev[select] > best["metrics"][select]:
                best = {"step": step, "metrics": dev, "test": None,
                        "state": read_state(prompt) if keep_prompt else None}
                if not keep_prompt and splits.test is not None:  # no prompt to restore later: score test now
                    best["test"] = evaluate(engine, splits.test, labels, cfg.train.eval_batch_size, pad_id, rank,
                                            sizes.world_size, device)
            t_log += time.perf_counter() - t_eval  # keep eval time out of train throughput

        stop = preemption is not None and metrics.any_rank(preemption.requested)
        if save is not None and (stop or (cfg.train.save_every and step % cfg.train.save_every == 0)):
            save(step, {"step": step, "best": best, "window": window, "window_s": time.perf_counter() - t_log,
                        "guards": guards, "wandb_run_id": tracker.run_id})
        if stop:
            tracker.print(f"preempted: checkpoint saved at step {step}")
            return {"preempted": True, "step": step}

    final_prompt = best_prompt = None
    test = best["test"]
    if keep_prompt:
        final_prompt = prompt.export(read_state(prompt))
        write_state(prompt, best["state"])
        best_prompt = prompt.export(best["state"])
        if splits.test is not None:
            test = evaluate(engine, splits.test, labels, cfg.train.eval_batch_size, pad_id, rank,
                            sizes.world_size, device)
    if test is not None:
        tracker.log(schedule.total_steps, flat("test", test))
        tracker.print(f"best dev step {best['step']}: test accuracy {test['accuracy']:.4f} "
                      f"macro-F1 {test['macro_f1']:.4f}")
    guards = {k: v for k, v in guards.items() if k != "init_norm"}
    tracker.print(f"stability: {stability(guards)}")
    return {"preempted": False, "best_step": best["step"], "dev": best["metrics"], "test": test,
            "prompt": best_prompt, "final_prompt": final_prompt, "guards": guards}
