"""A worker for tests/test_sweep.py to start with ``sweep_worker.launch``: as its process
exits, it writes how many objects were frozen (see ``widedeep.cli.skip_final_collections``)
to the file its job names, and exits with the job's code."""

from __future__ import annotations

import atexit
import gc
import json
from pathlib import Path


def _worker_main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    out = Path(job["out"])
    atexit.register(lambda: out.write_text(str(gc.get_freeze_count())))
    return int(job["code"])
