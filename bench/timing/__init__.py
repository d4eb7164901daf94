"""The measurements behind bench/throughput.py, shared by bench/ddp.py and bench/gpu_check.py.

- data_path: the digits images, the reference-style and bsdist input pipelines, and timing them alone;
- training:  the reference-style training step and bsdist's, through its Trainer;
- peak:      the measured bf16 matmul peak, the FLOPs of a training image and the CUDA sweep's settings;
- grid:      the reference grid's wall time, estimated from runs launched side by side;
- jpeg_input: JPEG files through bsdist's worker path, the ImageFolder + PIL reference and decoding on the device.

Importing the package puts the repository root on sys.path, so that the benchmarks use this checkout's bsdist.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
