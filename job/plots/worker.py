"""The plot worker process (``python -m job.plots.worker``): renders the requests that
``job.plots.background`` sends, on CPU time that training leaves idle."""

from __future__ import annotations

import base64
import sys
from typing import Any

from job.plots.background import IDLE, decode_request
from job.plots.charts import RENDERERS
from job.runtime.workers import run_in_idle_time, serve


def render(request: dict[str, Any]) -> dict[str, Any]:
    plot, arguments = decode_request(request)
    return {"png": base64.b64encode(RENDERERS[plot](**arguments)).decode("ascii")}


if __name__ == "__main__":
    if IDLE in sys.argv[1:]:
        run_in_idle_time()  # a picture can wait: the worker gets only CPU time that training leaves
    serve(render)
