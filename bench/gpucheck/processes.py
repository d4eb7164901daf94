"""Checks 4 and 7 on ranks started by torchrun: each on the GPU of its LOCAL_RANK, or refused / sharing one
GPU (device_binding), and SyncBatchNorm training like one process at the same global batch (sync_bn).
The torchrun workers they start are in gpucheck/workers.py."""

from __future__ import annotations

import torch

from gpucheck.runs import Context, Run, Skip, last_lines, relative_distance, require, torchrun_worker

SYNC_BN_TOLERANCE = 1e-3  # relative L2 distance of all weights and BatchNorm statistics (measured on CPU: 7e-5)


def check_device_binding(ctx: Context):
    if not ctx.cuda or ctx.gpus >= 2:
        ranks = torchrun_worker(ctx, "devices")["ranks"]
        figures = {"ranks": ranks}
        seen = ", ".join(f"rank {r['rank']} (LOCAL_RANK {r['local_rank']}) on {r['device']}" for r in ranks)
        if not ctx.cuda:
            raise Skip(f"needs CUDA (rehearsed on CPU: torchrun started 2 ranks, {seen})", figures)
        distinct = len({r["uuid"] for r in ranks}) == len(ranks)
        require(distinct and all(r["device"] == f"cuda:{r['local_rank']}" for r in ranks),
                f"torchrun's ranks are not each on the GPU of their LOCAL_RANK: {seen}", figures)
        uuids = ", ".join(r["uuid"] for r in ranks)
        return f"{seen}: two distinct GPUs ({uuids}); an NCCL all-reduce across them worked", figures
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    refused = Run(ctx, "one-gpu-nccl", ["TRAIN.dist_backend", "auto"], nproc=2)
    shared = Run(ctx, "one-gpu-gloo", ["TRAIN.dist_backend", "gloo"], nproc=2)
    refused.wait()
    naming = [line for line in refused.err.splitlines() if "share one GPU" in line]
    figures = {"uuid": uuid, "refused_exit": refused.rc, "refusal": naming}
    require(refused.rc != 0 and len(naming) == 1 and uuid in naming[0],
            f"2 NCCL ranks on one GPU were not refused in one line naming {uuid} (exit {refused.rc}): "
            f"{last_lines(refused.err)}",
            figures)
    shared.succeeded()
    require("2 process(es) on cuda" in shared.out,
            f"the gloo run did not train 2 processes on the GPU: {last_lines(shared.out)}")
    return (f"one GPU: NCCL refused in one line ({naming[0].strip()[:120]}...); TRAIN.dist_backend gloo trained "
            "2 processes on it", figures)


def check_sync_bn(ctx: Context):
    backend = "auto" if ctx.gpus >= 2 else "gloo"  # one GPU: 2 processes share it through gloo
    fp32 = {"NVIDIA_TF32_OVERRIDE": "0"} if ctx.cuda else None  # fp32 means fp32: no TF32 convolutions or matmuls
    common = ["TRAIN.mixed_precision", "no", "TRAIN.compile", "false", "TRAIN.dist_backend", backend,
              # a small step keeps ResNet-18's fp32 noise from growing
              "OPTIMIZER.lr", "0.01", "OPTIMIZER.momentum", "0.0"]
    runs = {name: ctx.launch(f"bn-{name.replace(' ', '-')}", [*common, *extra], nproc=nproc, env=fp32,
                             config=ctx.small_config)
            for name, nproc, extra in [("one process", 1, []), ("synchronised", 2, ["MODEL.sync_bn", "true"]),
                                       ("per process", 2, ["MODEL.sync_bn", "false"])]}
    weights = {name: run.succeeded().weights() for name, run in runs.items()}
    synced = relative_distance(weights["one process"], weights["synchronised"])
    per_process = relative_distance(weights["one process"], weights["per process"])
    measured = torchrun_worker(ctx, "sync-bn", args=["--backend", backend], env=fp32)
    figures = {"distance_synchronised": synced, "distance_per_process": per_process, "tolerance": SYNC_BN_TOLERANCE,
               "backend": backend if ctx.gpus < 2 else "nccl", **measured}
    graphs, steps = measured["graphs"], measured["step_ms"]
    detail = (f"2 processes ({figures['backend']}) vs 1, resnet18 fp32 eager, global batch 32: "
              f"relative weight distance {synced:.1e} with SyncBatchNorm, {per_process:.1e} without "
              f"(tolerance {SYNC_BN_TOLERANCE:g} and below a tenth of the latter); "
              f"graphs compiled {graphs['off']} without, {graphs['on']} with ({graphs['breaks_on']} graph breaks); "
              f"eager step {steps['off']:.0f} ms without, {steps['on']:.0f} ms with "
              f"({ctx.device}, batch {measured['batch_per_process']} per process)")
    require(synced <= SYNC_BN_TOLERANCE and synced < 0.1 * per_process, detail, figures)
    return detail, figures
