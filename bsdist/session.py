"""The frame every run and every `--evaluate` executes in: the process group, rank 0's output, and the
way they end (together after an orderly end; a failed collective in one line; nothing left for
interpreter shutdown)."""

from __future__ import annotations

import contextlib
import sys
import traceback

import torch.distributed as dist

from bsdist import config
from bsdist.config import Config
from bsdist.distributed import init_distributed, shutdown
from bsdist.errors import PeerFailure, Stopped
from bsdist.output import make_output


@contextlib.contextmanager
def session(cfg: Config, run_dir: str):
    """(env, out) for the body: this process in its group, and the output of run_dir (rank 0's files, the
    other ranks' nothing). Every rank enters it, and the body's collectives are called by all or none."""
    device = config.check_device(cfg)  # on the machine that runs, SLURM nodes included
    env = init_distributed(device, cfg.TRAIN.dist_startup_timeout_s, cfg.TRAIN.dist_backend)
    out = make_output(env, run_dir)
    orderly = False  # every rank is alive and at the same point: leave together
    try:
        yield env, out
        orderly = True
    except Stopped as e:
        # the others wait until rank 0 has written last.pt, so none is cut short (srun's kill-on-bad-exit)
        orderly = True
        out.info(str(e), console=False)  # the log tells why the run paused; the launcher prints the error
        raise
    except RuntimeError as e:
        # NCCL raises DistError, gloo RuntimeError
        if not (isinstance(e, dist.DistError) or "gloo/transport" in str(e)):
            raise
        raise PeerFailure(f"rank {env.rank}: a collective failed ({str(e).strip().splitlines()[0][:160]}): "
                          f"another process died or stopped answering within the collective timeout; the last "
                          f"checkpoint is kept, continue with TRAIN.resume auto") from None
    finally:
        _release_frames(sys.exc_info()[1])  # a failed run's model and DDP go now, not at interpreter exit
        out.close()
        shutdown(wait_for=env if orderly else None)


def _release_frames(failure: BaseException | None) -> None:
    """Drop the local variables of the frames an exception (and those it arose from) still holds, so
    that the process group is not kept alive by them (see distributed.shutdown)."""
    seen = set()
    while failure is not None and id(failure) not in seen:
        seen.add(id(failure))
        traceback.clear_frames(failure.__traceback__)
        failure = failure.__context__
