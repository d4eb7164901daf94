"""The checks of bench/gpu_check.py, grouped by theme; the script itself only runs them in order and reports.

- runs:        the checks' context and outcomes (Skip, CheckFailed), the child processes they start
               (launch.py runs, torchrun workers) and the generated CIFAR-10 the runs start from;
- environment: the versions in the report and check 1 (environment);
- resume:      checks 2 and 3 (stop_and_resume, resume_elsewhere);
- processes:   checks 4 and 7 (device_binding, sync_bn), ranks started by torchrun;
- steps:       checks 5 and 6 (fp16_scaler, no_host_sync), the training step itself;
- costs:       checks 8 and 9 (throughput, checkpoint_cost);
- jpeg_input:  check 10 (jpeg_input), image files decoded by the workers or on the device;
- workers:     what `gpu_check.py --worker ROLE` runs under torchrun for checks 4 and 7.
"""
