"""The checks of bench/gpu_check.py, grouped by theme; the script runs each in a child process and reports.

- context:    a check's context (device, sizes, --out folder, deadline), outcomes (Skip, CheckFailed), children;
- preflight:  the versions every report starts with and the pieces the checks need;
- costs:      throughput, checkpoint_cost and grid, the timed checks;
- jpeg_input: the data path, image files decoded by the workers or on the device;
- gpu_tests:  tests/test_gpu.py under pytest, the correctness checks.
"""
