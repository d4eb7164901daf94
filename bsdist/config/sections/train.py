"""The TRAIN and CRT sections: length, precision, checkpoints, sync points, resumption, stage 2."""

from __future__ import annotations

from dataclasses import dataclass

from bsdist.config.fields import at_least_one, non_negative, option, positive


@dataclass(frozen=True)
class Train:
    epochs: int = option(50, "training epochs", check=at_least_one)
    grad_accum_steps: int = option(1, "micro-batches per optimiser step (DDP no_sync on the inner ones)",
                                   check=at_least_one)
    mixed_precision: str = option("auto", "autocast dtype; fp16 adds a gradient scaler; auto is bf16 on CUDA (fp16 "
                                          "where the GPU lacks bf16) and no on CPU, where bf16 is emulated and slow",
                                  choices=("auto", "fp16", "bf16", "no"))
    log_interval: int = option(10, "optimiser steps between console lines", check=at_least_one, resumable=True)
    ckp_metric: str = option("bcr", "metric choosing best.pt (lower is better for loss)",
                             choices=("bcr", "acc", "loss"))
    compile: bool | str = option("auto", "torch.compile the model; auto compiles on CUDA only", kind="auto_bool",
                                 resumable=True)
    ddp_bucket_mb: float = option(25.0, "size of DDP's gradient all-reduce buckets in MB (ResNet-18's gradients are "
                                        "45 MB in fp32); at least DDP's 1 MB first bucket, which torch.compile's "
                                        "split at the buckets requires", check=at_least_one, resumable=True)
    device: str = option("auto", "training device; auto picks cuda when available, and refuses to train on the CPU "
                                 "of a node whose GPUs CUDA cannot see", choices=("auto", "cuda", "cpu"),
                         resumable=True)  # a GPU run may continue on CPU, and back
    dist_backend: str = option("auto", "collectives: auto is NCCL for CUDA tensors (gloo for host objects) and gloo "
                                       "on CPU; gloo on CUDA is slow but lets several processes share one GPU",
                               choices=("auto", "gloo"), resumable=True)
    ckpt_every_steps: int = option(0, "also write last.pt every this many optimiser steps inside an epoch (0: at "
                                      "epoch ends only); a resume continues from that exact step",
                                   check=non_negative, resumable=True)
    check_every_steps: int = option(20, "optimiser steps between the host's reads of what the processes agree on "
                                         "(stop signals, non-finite losses), besides every log point and "
                                         "checkpoint; the step itself never waits for the device, so a signal or a "
                                         "non-finite loss is acted on up to this many steps later",
                                    check=at_least_one, resumable=True)
    nonfinite: str = option("stop", "on a non-finite loss (seen by all ranks at the same step): stop, keeping the "
                                    "last good checkpoint, or skip the step (no weight, momentum or BatchNorm "
                                    "statistic changes)", choices=("stop", "skip"),
                            resumable=True)
    resume: bool | str = option(False, "auto continues the run in the run directory from last.pt, or starts it; true "
                                       "must continue one; false refuses a directory that holds a run (a checkpoint "
                                       "or results)", kind="auto_bool", resumable=True)
    dist_timeout_s: int = option(600, "timeout of every collective after the first epoch, in seconds: a peer that "
                                      "dies or hangs stops the others within it", check=positive, resumable=True)
    dist_startup_timeout_s: int = option(1800, "the collectives' timeout from start-up through the first epoch "
                                               "(data download, compilation), in seconds; joining the process "
                                               "group itself may take at most 300 s of it", check=positive,
                                         resumable=True)


@dataclass(frozen=True)
class Crt:
    stage1: str | None = option(None, "decoupled stage 2 (classifier re-training, cRT): the run directory of a "
                                      "finished stage-1 run whose selected model (best.pt) this run loads and "
                                      "freezes (BatchNorm included), training only a re-initialised classifier; "
                                      "null: a run of its own", kind="str")
