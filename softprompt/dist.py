"""The process group, and every collective the project calls, by name.

Failures are reported truthfully from every rank: each rank posts its first error to the rendezvous
store, and rank 0 prints them, the cause first (an error that is not a broken or timed-out
connection, then the earliest). A collective that waits longer than `--dist_timeout` fails, and the
ranks that never reported are named as the ones that stopped, with the last step they reached.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import socket
import sys
import time

import torch
import torch.distributed as dist

_state = {"phase": "setup", "timeout_s": 600.0}
REPORT_WAIT_S = 5.0  # how long rank 0 waits for the other ranks' error reports
# Text of torch/gloo/NCCL errors that only say a peer is gone or late: the cause is elsewhere.
_COMMUNICATION = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "Broken pipe",
                  "NCCL communicator was aborted", "recvValue", "Socket Timeout")


def is_main_process() -> bool:
    """Rank 0, known from the launcher's environment even before the process group exists."""
    return os.environ.get("RANK", "0") == "0"


def free_port() -> int:
    """A free TCP port for a rendezvous (--master_port), from 10000-19999: below the kernel's ephemeral
    range, where an outgoing connection (gloo opens many) can take a port between the pick and the
    launcher's bind, and below slurm/train.sbatch's ports."""
    rng = random.Random()  # seeded from the OS: not the global RNG, which seeded runs share
    for _ in range(200):
        port = rng.randrange(10000, 20000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free TCP port in 10000-19999")


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(), acc.current_device())


def init(timeout_s: float) -> tuple[int, int]:
    """Join the process group a launcher (deepspeed, srun) started, or start a 1-process group for
    `python train.py`. Returns (rank, world size)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    if get_accelerator().device_name() != "cpu":  # one device per rank on a node, chosen before anything allocates
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (minutes on 2 cores) and leaves
    # a 69 MB /dev/shm buffer per rank behind after every run (never unlinked). Our collectives are plain
    # all-reduce/all-gather of small tensors and ZeRO's reduce-scatter, which that op does not serve: use gloo's.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _state["timeout_s"] = timeout_s
    deepspeed.init_distributed(verbose=False, timeout=datetime.timedelta(seconds=timeout_s))
    if device().type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # torch gives every process all cores; N ranks on one node would oversubscribe them N-fold.
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
    return dist.get_rank(), dist.get_world_size()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def close(synchronize: bool = False) -> None:
    """`synchronize`: every rank got here (a clean finish), so wait for all before tearing the group down:
    a rank that destroys its group while rank 0 still writes the outputs can abort at exit. Not after an
    error: the others may be in another collective."""
    if _active():
        if synchronize:
            phase("final barrier")
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if _active():
        dist.barrier()


def _on_device(t: torch.Tensor) -> torch.Tensor:
    """NCCL reduces device tensors only; gloo takes CPU tensors."""
    return t.to(device()) if dist.get_backend() == "nccl" else t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (identity in a single process); returned where `t` was."""
    if _active() and dist.get_world_size() > 1:
        buf = _on_device(t.clone())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)
    return t


def any_rank(*flags) -> list[bool]:
    """For each flag (bools or 0-dim tensors), True on every rank if it is true on any rank. One collective."""
    local = torch.stack([torch.as_tensor(f, dtype=torch.float32, device="cpu").reshape(()) for f in flags])
    return [v > 0 for v in all_reduce_sum(local).tolist()]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a single process)."""
    if _active() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _store(timeout_s: float):
    if not _active():
        return None
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    return store


def phase(text: str, step: int | None = None) -> None:
    """What this rank does now (named in a timeout report); posted to the store at step boundaries."""
    _state["phase"] = text if step is None else f"step {step}: {text}"
    if step is not None and _active() and dist.get_world_size() > 1:
        _store(_state["timeout_s"]).set(f"softprompt/beat/{dist.get_rank()}",
                                        f"{_state['phase']} at {time.strftime('%H:%M:%S')}")


def is_communication_error(e: BaseException) -> bool:
    return isinstance(e, (RuntimeError, OSError, dist.DistError)) and any(s in str(e) for s in _COMMUNICATION)


def report(e: BaseException, message: str) -> list[str]:
    """Post this rank's first error and return the lines this rank prints: on rank 0 every rank's error, the
    cause first; elsewhere nothing, unless rank 0 cannot be reached. Before the process group exists every
    rank checked the same inputs, so rank 0 alone speaks."""
    if not _active():
        return [message] if is_main_process() else []
    rank, world = dist.get_rank(), dist.get_world_size()
    ours = {"rank": rank, "t": time.time(), "comm": is_communication_error(e), "msg": message,
            "phase": _state["phase"]}
    try:
        store = _store(REPORT_WAIT_S)
        store.set(f"softprompt/error/{rank}", json.dumps(ours))
    except Exception:  # noqa: BLE001 - the store lives in rank 0: if it is gone, speak for ourselves
        return [f"rank {rank}: {message} (rank 0, which hosts the rendezvous store, does not answer)"]
    if rank != 0:
        return []
    keys = [f"softprompt/error/{r}" for r in range(world)]
    deadline = time.monotonic() + REPORT_WAIT_S
    while time.monotonic() < deadline and not store.check(keys):
        time.sleep(0.1)
    reports = [json.loads(store.get(k)) for k in keys if store.check([k])]
    silent = sorted(set(range(world)) - {r["rank"] for r in reports})
    reports.sort(key=lambda r: (r["comm"], r["t"]))
    first = reports[0]
    if all(r["msg"] == first["msg"] for r in reports) and not silent:
        return [first["msg"]]  # the same error everywhere (e.g. a bad input every rank checked)
    lines = [f"rank {first['rank']}: {first['msg']}"]
    if silent and first["comm"]:
        beats = []
        for r in silent:
            try:
                beats.append(f"rank {r}: last at {store.get(f'softprompt/beat/{r}').decode()}")
            except Exception:  # noqa: BLE001 - never reported a step
                beats.append(f"rank {r}: never reached the first step")
        lines = [f"rank(s) {', '.join(map(str, silent))} stopped answering (hung, stopped or killed) while rank "
                 f"{first['rank']} was at {first['phase']}: {'; '.join(beats)}", *lines]
    lines += [f"  then rank {r['rank']}: {r['msg']}" for r in reports[1:] if r["msg"] != first["msg"]][:8]
    return lines


def print_error(lines: list[str]) -> None:
    for i, line in enumerate(lines):
        print(("error: " if i == 0 else "") + line, file=sys.stderr, flush=True)
