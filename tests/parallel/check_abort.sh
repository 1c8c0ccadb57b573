#!/usr/bin/env bash
# An exception on one rank ends the whole mpirun job (run_or_abort -> MPI_Abort): a nonzero status
# well before the timeout, with the error printed once.
# Usage: check_abort.sh <timeout-seconds> <mpirun command ...>
set -u
limit=$1; shift
out=$(HYD_TEST_ABORT=1 timeout "$limit" "$@" 2>&1)
rc=$?
echo "$out"
if [ "$rc" -eq 0 ]; then echo "FAIL: the job exited 0 although rank 1 threw"; exit 1; fi
if [ "$rc" -eq 124 ]; then echo "FAIL: the job hung (killed after ${limit}s)"; exit 1; fi
n=$(printf '%s\n' "$out" | grep -c "error on rank 1: deliberate failure for the abort test")
if [ "$n" -ne 1 ]; then echo "FAIL: the error was printed $n times, expected once"; exit 1; fi
echo "OK: job ended with status $rc, error printed once"
