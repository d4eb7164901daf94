#!/usr/bin/env bash
# Mutation testing of the loss, the long-tail split, metrics, augmentation, checkpoints, the schedule and the
# step (setup.cfg's [mutmut] section), with mutmut 3.3.1 on one core. From the repository root:
#   tests/mutation/run.sh            # all mutants (about 16 minutes on one EPYC core), then the summary
#   tests/mutation/run.sh NAME ...   # only these mutants (names as `mutmut results` prints them)
# Three departures from a plain `mutmut run`, each needed here:
# - one OpenMP thread: mutmut forks a child per mutant after torch has used its thread pool, and a forked
#   child hangs at its first parallel op (libgomp after fork), which would read as a timeout;
# - mutmut started through `python -c`: tests/spawn.py starts ranks with "spawn", which re-runs the parent's
#   main file, and mutmut 3.3.1's main module sets the fork start method at import (mutmut issue #466);
# - sitecustomize.py (this folder) on PYTHONPATH: processes a test starts run the original code during
#   mutmut's stats pass, where a mutated function would need mutmut's config, which only its own process has.
#   So mutmut credits a function only with the tests that call it in the pytest process.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import mutmut" 2>/dev/null || pip install -q "mutmut==3.3.1"
rm -rf mutants
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$PWD/tests/mutation${PYTHONPATH:+:$PYTHONPATH}"
python -c 'import sys; sys.argv[0] = "mutmut"; from mutmut.__main__ import cli; cli()' run --max-children 1 "$@" || true
python -c 'import sys; sys.argv[0] = "mutmut"; from mutmut.__main__ import cli; cli()' results --all true \
  | awk '{n++; s[$NF]++} END {for (k in s) print k, s[k]; print "total", n}'
