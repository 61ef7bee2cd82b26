"""A report section for tests/test_report.py to draw in a process of its own (report.Apart):
what ``ctx.env`` asks of it -- fail, wait, or write a file naming its process (and, as
the process exits, one saying how many objects it froze: ``frozen.txt``)."""

from __future__ import annotations

import atexit
import gc
import os
import time

from widedeep.errors import UserError


def render(ctx) -> str:
    if ctx.env.get("fail"):
        raise UserError("the section failed in its own process")
    if ctx.env.get("wait"):
        time.sleep(60)
    (ctx.out / "drawn_by.txt").write_text(str(os.getpid()))
    frozen = ctx.out / "frozen.txt"
    atexit.register(lambda: frozen.write_text(str(gc.get_freeze_count())))
    ctx.sweeps.append({"name": "apart", "ran_now": 0})
    return "## drawn apart\n"
