"""Inference with one or many trained prompts on one frozen model.

    python -m softprompt.predict --model M --prompt [TASK=]PATH [--prompt ...] \\
        --input FILE --output preds.jsonl [--task_field task] [--ensemble mean|vote]

A prompt is our prompt.safetensors (prompt.json beside it), a run's output dir, or a PEFT
prompt-tuning adapter (softprompt/export.py); an adapter without our prompt.json takes its classes
from `--labels` and `--verbalizer_words`/`--verbalizer_ids` (and `--label_scoring`).

One frozen model serves many tasks (Lester et al.'s multi-task serving): each input row names its
task, and a batch mixes rows of different tasks in ONE forward, each row with its own prompt and
its own verbalizer, scored as it trained (`label_scoring` in prompt.json). With `--ensemble`,
every row is scored by every prompt (same label set) and the probabilities are averaged (`mean`)
or the per-prompt predictions vote (`vote`; ties go to the higher mean probability). Under the
deepspeed launcher (`deepspeed --num_gpus N --module softprompt.predict ...`) with a ZeRO-3
`--ds_config`, ranks share the rows and each row is predicted exactly once; rank 0 writes the
output atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dist, dsconfig, export, loading, scoring, verbalizer
from .collate import collate, shard_batches
from .config import ConfigError, PromptDepth
from .datafiles import read_file, where_row
from .io import write_text
from .prompt import SoftPrompt, gathered, layers_for
from .tokenize import EmptyTextError, encode, tokenizer_hash

DIST_TIMEOUT_S = 600.0


@dataclass
class Task:
    name: str
    prompt: torch.Tensor  # (L, P, D) fp32: L = 1 for an input prompt, the encoder's layers for deep prompts
    label_names: list[str]
    pieces: list[list[int]]  # verbalizer token ids per class
    max_length: int | None
    scoring: str = "first_mean"  # --label_scoring it trained with (a prompt.json from before the flag: first_mean)


def parse_prompt_arg(arg: str) -> tuple[str, Path]:
    """`TASK=PATH` or `PATH` (the task is then the name of the directory that is or holds the prompt)."""
    name, sep, path = arg.partition("=")
    if not sep:
        path = arg
        name = Path(arg).resolve().name if Path(arg).is_dir() else Path(arg).resolve().parent.name
    return name, Path(path)


def load_tasks(args, model_config, tokenizer, tok_hash: str) -> list[Task]:
    """The prompts and their metadata, checked against the model (d_model, layer counts, tokenizer)."""
    d_model = model_config.d_model
    layers = sorted({layers_for(depth, model_config) for depth in typing.get_args(PromptDepth)})
    flags = export.classes_from_flags(args.labels, args.verbalizer_ids, args.verbalizer_words, tokenizer,
                                      model_config.vocab_size)
    if args.label_scoring and flags is None:
        raise ConfigError("--label_scoring goes with --labels (a prompt without prompt.json); prompt.json records "
                          "how its prompt trained")
    tasks, used_flags = [], False
    for arg in args.prompt:
        name, path = parse_prompt_arg(arg)
        values, meta = export.read_prompt(path, "--prompt", d_model)
        if not meta:
            if flags is None:
                raise ConfigError(f"--prompt {path}: no prompt.json (labels, verbalizer) beside it: give --labels "
                                  "A,B,... and --verbalizer_words W1,W2,... (or --verbalizer_ids) for its classes")
            meta, used_flags = {**flags, "label_scoring": args.label_scoring or "first_mean"}, True
        values = values if values.dim() == 3 else values.unsqueeze(0)
        if values.shape[-1] != d_model:
            raise ConfigError(f"--prompt {path}: d_model {values.shape[-1]} does not match the model's {d_model}")
        if values.shape[0] not in layers:
            raise ConfigError(f"--prompt {path}: a prompt of {values.shape[0]} layers; this model takes "
                              f"{' or '.join(map(str, layers))} (input, encoder, encoder + decoder)")
        if tasks and values.shape[0] != tasks[0].prompt.shape[0]:
            raise ConfigError(f"--prompt {path}: prompts of different depths cannot be mixed in one run")
        if "tokenizer_hash" in meta and meta["tokenizer_hash"] != tok_hash:
            raise ConfigError(f"--prompt {path}: trained with another tokenizer "
                              f"(hash {meta.get('tokenizer_hash')}, the model's is {tok_hash})")
        if name in {t.name for t in tasks}:
            raise ConfigError(f"--prompt {arg}: task {name!r} given twice (name them: --prompt NAME=PATH)")
        label_scoring = meta.get("label_scoring", "first_mean")
        if label_scoring not in scoring.SCORINGS:
            raise ConfigError(f"--prompt {path}: label_scoring {label_scoring!r} in prompt.json is not one of "
                              f"{', '.join(scoring.SCORINGS)}")
        tasks.append(Task(name, values.float(), meta["label_names"], meta["verbalizer_ids"], meta.get("max_length"),
                          label_scoring))
    if flags is not None and not used_flags:
        raise ConfigError("--labels: every --prompt has its own prompt.json (labels, verbalizer); drop the flag")
    return tasks


def row_tasks(task_column: list[str] | None, tasks: list[Task], ensemble: str | None, n: int,
              path: Path) -> list[int]:
    """Index of the task each row uses (-1 = all of them, for an ensemble)."""
    names = {t.name: i for i, t in enumerate(tasks)}
    if ensemble:
        if any(t.label_names != tasks[0].label_names for t in tasks):
            raise ConfigError(f"--ensemble needs prompts with the same labels, got "
                              f"{[t.label_names for t in tasks]}")
        return [-1] * n
    if task_column is None:
        if len(tasks) > 1:
            raise ConfigError("several prompts: give --task_field (each row names its task) or --ensemble")
        return [0] * n
    out = []
    for row, name in enumerate(task_column):
        if name not in names:
            raise ConfigError(f"{where_row(path, row)}: unknown task {name!r} (prompts: {', '.join(names)})")
        out.append(names[name])
    return out


def stack_prompts(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """K (L, P, D) prompts -> (K, L, Pmax, D), left-padded with zeros, and their (K, Pmax) mask."""
    width = max(p.shape[1] for p in prompts)
    L, D = prompts[0].shape[0], prompts[0].shape[2]
    out = torch.zeros(len(prompts), L, width, D)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for k, p in enumerate(prompts):
        out[k, :, width - p.shape[1]:] = p
        mask[k, width - p.shape[1]:] = 1
    return out, mask


def stack_heads(heads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, Cmax, D) verbalizer heads and a (K, Cmax) mask of real classes."""
    width = max(h.shape[0] for h in heads)
    out = torch.zeros(len(heads), width, heads[0].shape[1])
    mask = torch.zeros(len(heads), width, dtype=torch.bool)
    for k, h in enumerate(heads):
        out[k, :h.shape[0]] = h
        mask[k, :h.shape[0]] = True
    return out, mask


def combine(probs: torch.Tensor, mode: str) -> tuple[torch.Tensor, int]:
    """(K, C) per-prompt probabilities -> (mean probabilities, predicted class)."""
    mean = probs.mean(0)
    if mode == "mean":
        return mean, int(mean.argmax())
    votes = torch.bincount(probs.argmax(-1), minlength=probs.shape[1]).double()
    return mean, int((votes + mean.double() * 1e-3).argmax())  # mean probability < 1 vote breaks ties


@torch.no_grad()
def predict_rows(model, ids: list[list[int]], task_idx: list[int], tasks: list[Task], heads, ensemble,
                 batch_size: int, pad_id: int, rank: int, world: int, device) -> list[tuple[int, int, list[float]]]:
    """(row, task, probabilities) for this rank's contiguous shard (`shard_batches`)."""
    prompts, prompt_mask = stack_prompts([t.prompt for t in tasks])
    head, class_mask = heads
    out = []
    for rows in shard_batches(len(ids), batch_size, rank, world):
        batch = collate([{"input_ids": ids[r], "label": 0} for r in rows or [0]], pad_id).to(device)
        rows_tasks = torch.tensor([task_idx[r] for r in rows] or [0])
        per_prompt = range(len(tasks)) if ensemble else [None]
        probs = []
        for k in per_prompt:  # one forward per batch; an ensemble needs one per prompt
            t = rows_tasks.clamp(min=0) if k is None else torch.full_like(rows_tasks, k)
            if model.rank is not None:  # some task's words are scored over all their pieces
                scores = model.rank_scores(batch.input_ids, batch.attention_mask, prompts[t].to(device),
                                           prompt_mask[t].to(device), t.to(device)).float().cpu()  # (B, C)
            else:
                hidden = model.hidden(batch.input_ids, batch.attention_mask, prompts[t].to(device),
                                      prompt_mask[t].to(device)).float().cpu()  # (B, D)
                scores = torch.einsum("bd,bcd->bc", hidden, head[t]).masked_fill(~class_mask[t], float("-inf"))
            probs.append(scores.softmax(-1))  # (B, C)
        for i, r in enumerate(rows):
            out.append((r, task_idx[r], torch.stack([p[i] for p in probs]).tolist()))
    return out


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from launcher.args import Parser

    p = Parser(prog="python -m softprompt.predict", description="\n\n".join(__doc__.split("\n\n")[:3]))
    p.add_argument("--model", default="tiny", help="the frozen model the prompts were trained on")
    p.add_argument("--prompt", action="append", required=True,
                   help="[TASK=]PATH: prompt.safetensors (prompt.json beside it), a run's output dir, or a PEFT "
                        "prompt-tuning adapter dir (or its adapter_model.safetensors); repeat for several tasks")
    p.add_argument("--input", required=True, help="jsonl, csv or tsv file of rows to classify")
    p.add_argument("--output", required=True, help="predictions, one JSON line per input row")
    p.add_argument("--text_field", default="text", help="field holding the text")
    p.add_argument("--text_pair_field", default=None, help="optional second text field")
    p.add_argument("--task_field", default=None, help="field naming each row's task (mixed-task input)")
    p.add_argument("--label_field", default=None, help="optional gold labels: accuracy is printed")
    p.add_argument("--ensemble", choices=("mean", "vote"), default=None,
                   help="score every row with every prompt and combine")
    p.add_argument("--max_length", type=positive_int, default=None,
                   help="truncate inputs (default: what the prompts were trained with)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="rows per forward, per rank")
    p.add_argument("--labels", default=None,
                   help="comma-separated classes of a --prompt without prompt.json (a PEFT adapter from elsewhere)")
    p.add_argument("--verbalizer_words", default=None, help="with --labels: one label word per class")
    p.add_argument("--verbalizer_ids", default=None, help="with --labels: one token id per class")
    p.add_argument("--label_scoring", choices=scoring.SCORINGS, default=None,
                   help="with --labels: how a label word of several pieces scores, as the prompt trained "
                        "(train.py --help; default first_mean)")
    p.add_argument("--ds_config", default=None,
                   help="DeepSpeed JSON (ZeRO-3 shards the frozen model across ranks); none = plain model")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def check_paths(args) -> None:
    """--input readable, --output a file path that is not the input (it is replaced only at the end)."""
    path, out = Path(args.input), Path(args.output)
    if not path.is_file():
        raise ConfigError(f"--input {path}: file not found")
    if out.is_dir():
        raise ConfigError(f"--output {out}: is a directory; give the predictions file's path")
    if out.resolve() == path.resolve() or (out.exists() and os.path.samefile(out, path)):
        raise ConfigError(f"--output {out}: is the --input file {path}; it would be overwritten")


class NonFiniteError(RuntimeError):
    """The model produced NaN/Inf class scores from finite inputs."""


def check_finite(results, path: Path) -> None:
    """Every rank holds all results: all raise together, before rank 0 writes anything."""
    for row, _, probs in results:
        if not torch.tensor(probs).isfinite().all():
            raise NonFiniteError(f"{where_row(path, row)}: the class probabilities are NaN/Inf (the model's weights "
                                 "or its dtype overflow); nothing was written")


def run(args) -> int:
    from .model import PromptedMT5

    # Validate everything before any process group or output exists.
    check_paths(args)
    source = loading.model_source(args.model)
    model_config = loading.load_model_config(source)
    tokenizer = loading.load_tokenizer(source)
    tasks = load_tasks(args, model_config, tokenizer, tokenizer_hash(tokenizer))
    path = Path(args.input)
    fields = {"text": args.text_field}
    for key, value in (("text_pair", args.text_pair_field), ("task", args.task_field), ("label", args.label_field)):
        if value:
            fields[key] = value
    columns = read_file(path, fields)
    task_idx = row_tasks(columns.get("task"), tasks, args.ensemble, len(columns["text"]), path)
    max_length = args.max_length or max(t.max_length or 128 for t in tasks)
    try:
        ids = encode(tokenizer, columns["text"], columns.get("text_pair"), max_length)
    except EmptyTextError as e:
        raise ConfigError(f"{where_row(path, e.rows[0])}: field {fields[e.parts[0]]!r}: the text has no tokens") from None
    ds_config = None
    if args.ds_config:  # batch sizes and lr do not matter here: resolve any "auto" with the defaults
        raw, ds_source = dsconfig.load(args.ds_config)
        ds_config = dsconfig.resolve(raw, f"--ds_config {ds_source}", dsconfig.world_size_from_env())[0]

    rank, world = dist.init(DIST_TIMEOUT_S)
    try:
        bf16 = ds_config is not None and dsconfig.Settings.of(ds_config).bf16
        mt5 = loading.load_frozen_model(source, model_config, torch.bfloat16 if bf16 else torch.float32, ds_config)
        with gathered([mt5.lm_head.weight]):
            heads = stack_heads([verbalizer.class_head(mt5.lm_head.weight.detach(), t.pieces) for t in tasks])
            ranker = scoring.rank_head(mt5.lm_head.weight, [t.pieces for t in tasks], [t.scoring for t in tasks])
        model = PromptedMT5(mt5, SoftPrompt(tasks[0].prompt), heads[0][0], rank=ranker)
        model.requires_grad_(False)
        if ds_config:
            import deepspeed

            # No optimizer: the training JSON's optimizer section would make ZeRO build one.
            inference = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
            model = deepspeed.initialize(model=model, config=inference)[0].module
        device = dist.device()
        model.to(device).eval()
        mine = predict_rows(model, ids, task_idx, tasks, heads, args.ensemble, args.batch_size,
                            tokenizer.pad_token_id, rank, world, device)
        results = sorted(r for part in dist.gather_objects(mine) for r in part)
        check_finite(results, path)
        if rank == 0:
            write(args, results, tasks, columns.get("label"))
    finally:
        dist.close()
    return 0


def write(args, results, tasks: list[Task], gold: list | None) -> None:
    lines, correct = [], 0
    for row, k, probs in results:
        task = tasks[max(k, 0)]
        probs = torch.tensor(probs)  # (K, C): one row per prompt used
        mean, pred = combine(probs[:, :len(task.label_names)], args.ensemble or "mean")
        record = {"row": row, "task": f"ensemble-{args.ensemble}" if args.ensemble else task.name,
                  "label": task.label_names[pred],
                  "probs": {name: round(float(p), 6) for name, p in zip(task.label_names, mean)}}
        correct += gold is not None and str(gold[row]) == record["label"]
        lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")  # NaN is not JSON
    write_text(args.output, "".join(lines))
    print(f"wrote {len(lines)} predictions to {args.output}")
    if gold is not None:
        print(f"accuracy {correct / len(lines):.4f}")


def main(argv: list[str] | None = None) -> int:
    from launcher.args import UsageError

    try:
        return run(build_parser().parse_args(argv))
    except (ConfigError, UsageError, NonFiniteError) as e:
        if dist.is_main_process():
            print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteError) else 2


if __name__ == "__main__":
    sys.exit(main())
