"""Fresh-mode worker: ``python -m benchmarks.worker JOB.pkl RESULT.json``.

Why a separate entry point: each round must start from a cold interpreter, and a crash or hang in
one configuration (segfault in a native runtime) must not take the whole benchmark run down.
The result goes to a file, not stdout, because setup code (compilers, loggers) may print freely.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

from benchmarks.harness import run_job


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    job = pickle.loads(Path(job_path).read_bytes())
    result = run_job(job["spec"], job["threads"], job["warmup"], job["repeat"])
    Path(result_path).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
