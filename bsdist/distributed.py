"""The one process-group setup and the one place that knows the rank.

Every run, a single `python launch.py` included, is a process group: torchrun (or SLURM) provides
RANK / WORLD_SIZE / LOCAL_RANK and a rendezvous; without them the process is rank 0 of 1 with an
in-process store. Backend follows the device: nccl on CUDA, gloo on CPU. Collectives here are called
by every rank or by none, and all of them carry the group's timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bsdist.errors import BsdistError, PeerFailure


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# What a launcher (torchrun, SLURM) tells each process; a child that starts its own group must not inherit it.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Every process must have joined the group by then (the start-up timeout, for downloads and compilation, applies
# after): a process that never started, or gloo bound to an address other nodes cannot reach, fails here.
CONNECT_TIMEOUT_S = 300


def launched_as_main() -> bool:
    """Whether this process is rank 0 of its launch (known before any process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def restarted_by_launcher() -> bool:
    """Whether torchrun restarted this worker group after a failure, or SLURM requeued this job (so the run
    must resume)."""
    return any(int(os.environ.get(v) or 0) > 0 for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def world_size_from_env() -> int:
    """The world size a launcher announced, known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str, timeout_s: float, backend: str = "auto") -> DistEnv:
    """Join (or reuse) the default process group and pick this rank's device.

    On CUDA the group has two backends: NCCL for device tensors and gloo for host objects, so that
    ranks can compare their GPUs before NCCL (created lazily, at the first device collective) meets
    two ranks on one GPU. `backend` gloo runs device tensors through gloo as well (slow, but several
    processes may then share one GPU).
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", _visible_gpu(local_rank))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    nccl = device.type == "cuda" and backend != "gloo"
    if not dist.is_initialized():
        if "GLOO_SOCKET_IFNAME" not in os.environ:  # else gloo binds what the host name resolves to (127.0.1.1, say)
            gloo = gloo_interface(os.environ.get("NCCL_SOCKET_IFNAME", ""), [n for _, n in socket.if_nameindex()])
            if gloo:
                os.environ["GLOO_SOCKET_IFNAME"] = gloo
        connect_s = min(timeout_s, CONNECT_TIMEOUT_S)
        try:
            _join_group(rank, world_size, nccl, datetime.timedelta(seconds=connect_s))
        except RuntimeError as e:
            raise PeerFailure(
                f"rank {rank}: the group of {world_size} processes did not form within {connect_s:g} s "
                f"({str(e).strip().splitlines()[0][:120]}): check that every process started and reaches "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}; on nodes with several network "
                "interfaces set NCCL_SOCKET_IFNAME to the one the nodes reach each other on (bsdist gives "
                "GLOO_SOCKET_IFNAME the same)") from None
        set_collective_timeout(timeout_s)
    if nccl:
        gpu_uuid = str(torch.cuda.get_device_properties(device).uuid)
        check_distinct_gpus(all_gather_objects((socket.gethostname(), gpu_uuid)))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _join_group(rank: int, world_size: int, nccl: bool, timeout: datetime.timedelta) -> None:
    if "MASTER_ADDR" in os.environ:
        # torchrun keeps one rendezvous store for every restart of the worker group, so a restarted group
        # could read the keys of the one before (pytorch#135712): each attempt gets keys of its own.
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("cpu:gloo,cuda:nccl" if nccl else "gloo", rank=rank, world_size=world_size,
                                timeout=timeout, store=dist.PrefixStore(f"bsdist/attempt-{attempt}", store))
    else:
        # the same backends as several processes: a CUDA tensor through gloo is copied to the host (a sync)
        dist.init_process_group("cpu:gloo,cuda:nccl" if nccl else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, timeout=timeout)


def gloo_interface(nccl_ifname: str, names: list[str]) -> str | None:
    """GLOO_SOCKET_IFNAME for an NCCL_SOCKET_IFNAME: the first of this host's interfaces (names) that NCCL's
    setting selects. NCCL takes name prefixes (eth: eth0, eth1) and exact names after `=`, gloo exact names;
    None where the setting excludes (`^docker,lo`) or selects nothing here."""
    if not nccl_ifname or nccl_ifname.startswith("^"):
        return None
    exact, wanted = nccl_ifname.startswith("="), [w for w in nccl_ifname.lstrip("=").split(",") if w]
    return next((n for n in names for w in wanted if (n == w if exact else n.startswith(w))), None)


def check_distinct_gpus(gpus: list[tuple[str, str]]) -> None:
    """Refuse two ranks on one GPU (by host and GPU UUID): NCCL fails obscurely or hangs on that."""
    first = {}
    for rank, gpu in enumerate(gpus):
        if gpu in first:
            raise BsdistError(f"ranks {first[gpu]} and {rank} share one GPU ({gpu[1]} on {gpu[0]}), which NCCL "
                              "cannot do: start at most one process per visible GPU (torchrun --nproc_per_node, "
                              "CUDA_VISIBLE_DEVICES), or set TRAIN.dist_backend gloo to share it slowly")
        first[gpu] = rank


def _visible_gpu(local_rank: int) -> int:
    """This rank's GPU among the visible ones: its local rank when the node's GPUs are all visible
    (torchrun, srun without binding); the only one when a launcher bound one GPU to each process
    (that two processes did not get the same one is checked once the group exists)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise BsdistError(f"local rank {local_rank} has no GPU of its own among the {count} visible ones; "
                      "start one process per GPU (torchrun --nproc_per_node, or --gpus-per-node with --slurm)")


def set_collective_timeout(seconds: float) -> None:
    """Tighten the generous start-up timeout once compilation and the first evaluation are behind."""
    dist.set_timeout(datetime.timedelta(seconds=seconds))


def shutdown(wait_for: DistEnv | None = None) -> None:
    """Leave the process group; with `wait_for` (after an orderly end) only once every rank is done: a
    rank that tears its group down while a peer still works (rank 0 writing results) can abort in gloo's
    teardown.

    The group must really be gone before the interpreter shuts down. DDP's reducer holds it, and the
    run's objects form reference cycles, so without a collection here the group's C++ threads were torn
    down during interpreter finalisation, where they can no longer take the GIL: the process then
    aborted ("terminate called without an active exception", exit -6) after a run that had succeeded.
    """
    if dist.is_initialized():
        if wait_for is not None:
            all_reduce_sum(torch.zeros(1, device=wait_for.device)).item()  # NCCL only queues it: wait here
        gc.collect()
        dist.destroy_process_group()
    gc.collect()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj) -> list:
    """Every rank's obj, by rank (pickled between the processes; used at checkpoints, never in a step)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    dist.broadcast(tensor, src=0)
    return tensor


def decided_by_main(env: DistEnv, decide):
    """decide() run by rank 0 alone, and its answer (or its error, raised alike everywhere) given to every
    rank: where ranks' file systems differ (a node-local directory, a shared one that lags), they still act
    on one view. One broadcast through gloo, called by every rank."""
    answer = [None]
    if env.is_main:
        try:
            answer = [(True, decide())]
        except BaseException as e:
            answer = [(False, str(e) if isinstance(e, BsdistError) else f"rank 0 failed: {type(e).__name__}: {e}")]
            dist.broadcast_object_list(answer, src=0, device=torch.device("cpu"))
            raise
    dist.broadcast_object_list(answer, src=0, device=torch.device("cpu"))
    decided, value = answer[0]
    if not decided:
        raise BsdistError(value)  # rank 0 prints it
    return value


@contextlib.contextmanager
def every_rank_or_none(env: DistEnv):
    """Every rank runs the body; where it fails on some rank, that rank raises its error and every other
    stops here too with that reason, instead of waiting at the next collective (one all-gather, called by
    every rank): under torchrun, whichever rank exits first and is named in its summary, the summary gives
    the real reason."""
    try:
        yield
    except BaseException as e:
        _first_failure(str(e) if isinstance(e, BsdistError) else f"{type(e).__name__}: {e}")
        raise
    failure = _first_failure(None)
    if failure:
        raise BsdistError(failure)


@contextlib.contextmanager
def main_process_first(env: DistEnv):
    """Rank 0 runs the body first (e.g. downloads), then the first process of every other node (it finds
    rank 0's files on a shared file system, or writes its own into a node-local one), then the rest: no
    two processes write the same files at once, wherever the data directory lives.

    A process whose body fails says why at its turn's collective, and every other one stops there with that
    reason instead of waiting (one all-gather per turn, called by every rank): under torchrun, whichever rank
    exits first and is named in its summary, the summary gives the real reason.
    """
    turn = 0 if env.is_main else 1 if env.local_rank == 0 else 2
    for stage in range(3):
        with every_rank_or_none(env):
            if stage == turn:
                yield


def _first_failure(message: str | None) -> str | None:
    """Every rank's failure message of this turn (None: it did not fail); the first, naming its rank."""
    failures = [(rank, m) for rank, m in enumerate(all_gather_objects(message)) if m is not None]
    return f"rank {failures[0][0]} failed while preparing the run: {failures[0][1]}" if failures else None


def rank_max(device: torch.device, *values: float, on_device: torch.Tensor | None = None) -> list[float]:
    """Each value's maximum over all ranks, after the float64 tensor `on_device` if given: one all-reduce and
    one host read, so called by every rank or none, and never inside a training step. This is how the
    ranks agree: a flag any rank raised, a stop signal any rank received."""
    values = torch.tensor(values, dtype=torch.float64, device=device)
    return all_reduce_max(values if on_device is None else torch.cat([on_device, values])).tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether flag is true on any rank (every rank gets the same answer, so all of them act on it together)."""
    return bool(rank_max(device, float(flag))[0])


def sync_buffers_from_main(module: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics, so that the evaluated model is the saved one."""
    for b in module.buffers():
        broadcast_from_main(b.data)
