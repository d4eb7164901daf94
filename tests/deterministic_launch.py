"""launch.py in CUDA's deterministic mode, for tests/test_gpu.py's exact resume comparison: deterministic
algorithms (the caller sets CUBLAS_WORKSPACE_CONFIG, which cuBLAS reads at start-up) and cuDNN autotuning
held off: a run switches cudnn.benchmark on, and two processes could then time different convolution
algorithms as fastest and round differently."""

import os
import runpy
import sys

import torch

torch.use_deterministic_algorithms(True)
torch.backends.cudnn.deterministic = True
type(torch.backends.cudnn).benchmark = property(lambda module: False, lambda module, value: None)

if __name__ == "__main__":
    launch = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch.py")
    sys.argv = [launch, *sys.argv[1:]]
    runpy.run_path(launch, run_name="__main__")
