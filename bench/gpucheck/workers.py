"""What `gpu_check.py --worker ROLE` runs on each rank under torchrun (started by runs.torchrun_worker);
rank 0 writes the result to the --result file."""

from __future__ import annotations

import contextlib
import functools
import json
import os

import torch

# timing first: it puts the repository root on sys.path
from timing.training import Trainer

from bsdist.distributed import DistEnv, all_gather_objects, all_reduce_sum, init_distributed, shutdown


def worker_devices(args, env: DistEnv) -> dict:
    """Each rank's LOCAL_RANK, device and GPU UUID, after a device all-reduce (NCCL on CUDA) across them."""
    total = all_reduce_sum(torch.ones(1, device=env.device))
    mine = {"rank": env.rank, "local_rank": env.local_rank, "device": str(env.device),
            "uuid": str(torch.cuda.get_device_properties(env.device).uuid) if env.device.type == "cuda" else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    return {"ranks": all_gather_objects(mine), "all_reduce": total.item()}


def worker_sync_bn(args, env: DistEnv) -> dict:
    """Graphs dynamo compiles for bsdist's model with and without SyncBatchNorm (built by build_model, compiled with
    the cheap aot_eager backend: the graph splits are dynamo's, whatever the backend), and eager step times."""
    batch, steps = (16, 50) if env.device.type == "cuda" else (8, 3)
    counters = torch._dynamo.utils.counters
    graphs, breaks, step_ms = {}, {}, {}
    for sync_bn, key in ((False, "off"), (True, "on")):
        compile_cheaply = functools.partial(torch.compile, backend="aot_eager")
        with patched(torch, "compile", compile_cheaply):
            trainer = Trainer(batch, env, steps, True, "no", sync_bn=sync_bn)  # resets dynamo
            counters.clear()
            trainer.first_step()
        graphs[key] = counters["aot_autograd"]["total"]
        breaks[key] = sum(counters["graph_break"].values())
        if key == "on":
            graphs["break_reasons"] = sorted(counters["graph_break"], key=lambda r: -counters["graph_break"][r])[:3]
        trainer = Trainer(batch, env, steps, False, "no", sync_bn=sync_bn)
        trainer.epoch()
        seconds, timed = trainer.epoch()
        step_ms[key] = 1000 * seconds / timed
    graphs.update(breaks_off=breaks["off"], breaks_on=breaks["on"])
    return {"graphs": graphs, "step_ms": step_ms, "batch_per_process": batch, "timed_steps": steps}


@contextlib.contextmanager
def patched(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


WORKERS = {"devices": worker_devices, "sync-bn": worker_sync_bn}


def run_worker(args) -> None:
    env = init_distributed(args.device, 300, args.backend)
    try:
        result = WORKERS[args.worker](args, env)
        if env.rank == 0:
            with open(args.result, "w") as f:
                json.dump(result, f)
    finally:
        shutdown(wait_for=env)
