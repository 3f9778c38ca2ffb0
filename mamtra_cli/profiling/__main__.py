"""The CPU peak-memory worker of `measure_peak` (`python -m mamtra_cli.profiling`): one JSON payload on stdin,
one JSON line out."""

import json
import sys

from mamtra_cli.profiling import _cpu_worker

print(json.dumps(_cpu_worker(json.loads(sys.stdin.read()))))
