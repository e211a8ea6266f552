"""The parts of the training loop (softprompt/recipe.py runs it): the schedule, the data order, evaluation.

Data order is a function of (seed, epoch) and the *global* batch, never of the world size: each
step takes the next `global_batch` indices of the epoch's permutation, and rank r's k-th
micro-batch is slice (k * world + r) of it. So a 2-rank run and a 1-rank run with the same global
batch see the same examples per optimizer step, and their losses agree.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from . import dist, flops, metrics, verbalizer
from .collate import TokenTable, shard_batches
from .dsconfig import BatchSizes
from .prompt import read_state, write_state
from .tracking import Table, collapsed

if TYPE_CHECKING:
    from .recipe import RunResult


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


@torch.no_grad()
def evaluate(engine, split: TokenTable, label_names: list[str], batch_size: int, pad_id: int, rank: int, world: int,
             device) -> dict:
    """Metrics over `split`, every example counted exactly once across ranks.

    Each rank scores a contiguous shard (`shard_batches`: filler rows, not duplicated examples).
    """
    engine.eval()
    cm = torch.zeros(len(label_names), len(label_names), dtype=torch.long)
    for idx in shard_batches(len(split), batch_size, rank, world):
        batch = split.batch(idx or [0], pad_id).to(device)
        scores = engine(batch.input_ids, batch.attention_mask)
        if idx:
            cm += metrics.confusion(batch.labels.cpu(), verbalizer.predict(scores).cpu(), len(label_names))
    engine.train()
    return metrics.from_confusion(dist.all_reduce_sum(cm), label_names)


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


def finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def train_loop(run) -> RunResult:
    """Train, evaluate on dev per the schedule, then score the best-dev prompt on test. `run` is the
    TrainRecipe (softprompt/recipe.py): its engine, inputs, state, tracker and preemption flag.

    With --tune full there is no prompt to keep: test is scored at every new best dev instead. The loop
    returns early, after a checkpoint, when any rank was asked to stop (SIGUSR1/SIGTERM), and raises
    NonFiniteError as soon as a step's loss is not finite on any rank, before anything is saved.
    """
    from .recipe import Best, NonFiniteError, RunResult
    from .tracking import COLLAPSE_SHARE, memory_mb, norm_guard, stability

    engine, v, cfg, tracker, st = run.engine, run.inputs, run.cfg, run.tracker, run.state
    sizes, schedule, labels = v.sizes, v.schedule, v.splits.label_names
    splits = {name: TokenTable.of(split) for name, split in v.splits.items()}  # train, dev, test if given
    device, pad_id, rank = dist.device(), v.tokenizer.pad_token_id, run.rank
    prompt = engine.module.prompt  # None: full fine-tuning without a prompt
    keep_prompt = cfg.model.tune == "prompt"
    n_prompt = prompt.n_tokens if prompt is not None else 0
    weight = torch.tensor(v.class_weights, dtype=torch.float32, device=device) if v.class_weights else None
    select, t = cfg.train.select_metric, cfg.train

    def score(split):
        return evaluate(engine, split, labels, t.eval_batch_size, pad_id, rank, sizes.world_size, device)

    if st.step == 0 and prompt is not None:
        st.guards.init_norm = prompt_norm(prompt)
    window = st.window.to(device)  # loss x examples, examples, tokens since the last log
    # The restored window's examples were processed in the interrupted run's time, not ours.
    t_log = time.perf_counter() - st.window_s
    engine.train()

    for step in range(st.step + 1, schedule.total_steps + 1):
        dist.phase("forward/backward (ZeRO all-gather/reduce-scatter or gradient all-reduce)", step)
        epoch, step_in_epoch = divmod(step - 1, schedule.steps_per_epoch)
        if step_in_epoch == 0 or step == st.step + 1:
            order = epoch_order(len(splits["train"]), t.seed, epoch)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for idx in micro_batches(order, step_in_epoch, sizes, rank):
            batch = splits["train"].batch(idx, pad_id).to(device)
            scores = engine(batch.input_ids, batch.attention_mask)  # (B, C)
            loss = verbalizer.loss(scores, batch.labels, weight)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            B = len(batch)
            step_loss += loss.detach().double() * B
            window[1] += B
            window[2] += batch.attention_mask.sum() + n_prompt * B
        window[0] += step_loss
        st.step = step

        # One collective per step (and the step's one host sync): stop requests and non-finite losses.
        dist.phase("agreeing on stop requests and non-finite losses", step)
        stop, bad = dist.any_rank(run.preemption.requested, ~torch.isfinite(step_loss))
        if bad:
            raise NonFiniteError(f"step {step}: the training loss is not finite (NaN or Inf) on at least one rank; "
                                 "stopped before saving anything (lower the lr, check the data, or bound the prompt "
                                 "with --prompt_max_norm)")
        if step % t.log_every == 0 or step == schedule.total_steps:
            loss_sum, n_ex, n_tok = dist.all_reduce_sum(window.cpu()).tolist()
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
                record.update(norm_guard(prompt_norm(prompt), st.guards.init_norm))  # collective
                if record["train/runaway"] and st.guards.runaway_step is None:
                    st.guards.runaway_step = step
                    tracker.print(f"warning: step {step}: the prompt norm is {record['train/prompt_norm_ratio']:.1f}x "
                                  "its initial value (runaway; consider a lower lr, --prompt_max_norm or --prompt_init "
                                  "vocab|labels)")
            # The last step's, before clipping; DeepSpeed has none at ZeRO stage 0 without clipping.
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                record["train/grad_norm"] = float(grad_norm)
            if t.peak_tflops:
                window_flops = flops.train_flops(engine.module.mt5.config, n_ex, n_tok / n_ex)
                record["train/mfu"] = flops.mfu(window_flops, elapsed, t.peak_tflops, sizes.world_size)
            tracker.log(step, record)
            window.zero_()
            t_log = time.perf_counter()
            tracker.advance(loss=record["train/loss"], tok_s=record["train/tokens_per_s"])
        else:
            tracker.advance()

        if step in schedule.eval_steps:
            dist.phase("dev evaluation", step)
            t_eval = time.perf_counter()
            dev = score(splits["dev"])
            record = flat("eval", dev)
            tracker.log(step, record)
            tracker.print(f"step {step}: dev accuracy {dev['accuracy']:.4f} macro-F1 {dev['macro_f1']:.4f}")
            if record["eval/collapsed"]:
                st.guards.collapsed_steps.append(step)
                tracker.print(f"warning: step {step}: {COLLAPSE_SHARE:.0%} or more of the dev predictions "
                              f"are one class {dev['pred_counts']}")
            if st.best.metrics is None or dev[select] > st.best.metrics[select]:
                state = read_state(prompt) if keep_prompt else None
                if state is not None and not finite(state):
                    raise NonFiniteError(f"step {step}: the prompt is not finite (NaN or Inf); stopped before "
                                         "saving it")
                st.best = Best(step, dev, state)
                if not keep_prompt and "test" in splits:  # no prompt to restore later: score test now
                    st.best.test = score(splits["test"])
            eval_s = time.perf_counter() - t_eval
            t_log += eval_s  # keep eval time out of train throughput and the ETA
            tracker.exclude(eval_s)

        if stop or (t.save_every and step % t.save_every == 0):
            dist.phase("writing a checkpoint", step)
            st.window, st.window_s, st.wandb_run_id = window.cpu(), time.perf_counter() - t_log, tracker.run_id
            run.save_checkpoint()
        if stop:
            tracker.print(f"preempted: checkpoint saved at step {step}")
            return RunResult(preempted=True, step=step)

    dist.phase("test evaluation")
    final_prompt = best_prompt = None
    test = st.best.test
    if keep_prompt:
        final_prompt = prompt.export(read_state(prompt))
        write_state(prompt, st.best.state)
        best_prompt = prompt.export(st.best.state)
        if "test" in splits:
            test = score(splits["test"])
    if test is not None:
        tracker.log(schedule.total_steps, flat("test", test))
        tracker.print(f"best dev step {st.best.step}: test accuracy {test['accuracy']:.4f} "
                      f"macro-F1 {test['macro_f1']:.4f}")
    guards = {k: v for k, v in asdict(st.guards).items() if k != "init_norm"}
    tracker.print(f"stability: {stability(guards)}")
    return RunResult(False, st.step, st.best.step, st.best.metrics, test, best_prompt, final_prompt, guards)
