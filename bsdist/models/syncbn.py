"""bsdist's SyncBatchNorm: BatchNorm over the global batch, on CPU (gloo) and CUDA alike."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _GlobalBatchStats(torch.autograd.Function):
    """Batch normalisation over the batches of all ranks: one all-reduce forward, one backward.

    Every rank holds the same number of images (training drops the last partial batch), so the ranks'
    statistics combine with equal weights and no count is exchanged. torch's SyncBatchNorm instead drops
    empty ranks with a boolean mask, a host synchronisation per layer per step (pytorch#78549), and has no
    CPU kernels. The variance is never E[x^2] - E[x]^2, which loses every digit in fp32 when the mean
    dwarfs the spread (a mean of 1e4 and a spread of 0.1): each rank sums squared deviations from its own
    mean, and the ranks' means add theirs from the global one (Chan et al.'s pairwise combination).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, count):
        dims = [0, *range(2, x.ndim)]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least, also under autocast
        shape = (1, -1, *[1] * (x.ndim - 2))
        local_mean = xf.mean(dims)
        local = torch.stack([local_mean, (xf - local_mean.view(shape)).square().sum(dims)])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)  # gloo has no all_gather_into_tensor
        means, squared_deviations = torch.stack(gathered).unbind(1)
        mean = means.mean(0)
        per_rank = count // dist.get_world_size()
        var = (squared_deviations.sum(0) + per_rank * (means - mean).square().sum(0)) / count
        invstd = torch.rsqrt(var + eps)
        with torch.no_grad():
            running_mean.lerp_(mean, momentum)
            running_var.lerp_(var * (count / (count - 1)), momentum)
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count, ctx.shape = count, shape
        return (xhat * weight.view(shape) + bias.view(shape)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape = [0, *range(2, xhat.ndim)], ctx.shape
        dy = grad_out.to(xhat.dtype)
        grad_bias, grad_weight = dy.sum(dims), (dy * xhat).sum(dims)
        sums = torch.cat([grad_bias, grad_weight])  # each rank's loss gradient; DDP averages the parameters'
        dist.all_reduce(sums)
        sum_dy, sum_dy_xhat = (sums / ctx.count).view(2, *shape).unbind(0)
        grad_x = (dy - sum_dy - xhat * sum_dy_xhat) * (weight * invstd).view(shape)
        return grad_x.to(grad_out.dtype), grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (every rank's images), so
    2 ranks train like 1 process with the same global batch; CPU (gloo) and CUDA alike. Evaluation and
    a world of one process use plain BatchNorm. Parameters and buffers are BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if not self.training or world_size == 1:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        count = x.numel() // x.shape[1] * world_size
        return _GlobalBatchStats.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum,
                                       self.eps, count)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d in module replaced by a SyncBatchNorm holding the same parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            if not (child.affine and child.track_running_stats and child.momentum is not None):
                raise ValueError(f"{name}: SyncBatchNorm needs affine BatchNorm2d with running statistics and a "
                                 "momentum")
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, device=child.weight.device)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module
