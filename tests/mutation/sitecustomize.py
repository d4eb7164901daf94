"""Loaded (via PYTHONPATH) by every Python process of a mutmut run, the processes that tests start included.

mutmut 3.3.1 collects "which test calls which function" with MUTANT_UNDER_TEST=stats, and a mutated
function then calls mutmut.__main__.record_trampoline_hit, which needs mutmut's config, loaded only in
mutmut's own process. A process started by a test (the torch.multiprocessing 'spawn' ranks of
tests/spawn.py, the checkpoint writer subprocess of tests/test_checkpoint.py) would crash there, and
what it recorded would be lost anyway: such a process runs the original code during stats instead.
(mutmut's own process starts without MUTANT_UNDER_TEST, so it is not affected.)
"""
import os

if os.environ.get("MUTANT_UNDER_TEST") == "stats":
    os.environ["MUTANT_UNDER_TEST"] = ""
