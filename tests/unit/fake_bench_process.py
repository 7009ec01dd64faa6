"""A stand-in for a benchmark process (``python -m tests.unit.fake_bench_process``).

``ready``: announce readiness, wait for stdin to close, announce the stop.
``die``: exit at once with code 3, as a process that cannot connect does.
"""

import sys

if sys.argv[1] == "die":
    sys.exit(3)
print('{"event": "ready"}', flush=True)
sys.stdin.read()
print('{"event": "stopped"}', flush=True)
