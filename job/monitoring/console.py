"""stdout on a terminal: batch progress moves one bar per stage in place (tqdm: epoch, step,
loss, samples/s, ETA), and every other record is a readable line printed above the bar. Not on a
terminal (docker logs, CI) this is not used: stdout carries the JSON lines."""

from __future__ import annotations

import logging
from typing import Any, TextIO

from tqdm import tqdm

PROGRESS_EVENT = "train.progress"
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| step {n}/{total}{postfix}"


class ConsoleProgress(logging.StreamHandler):
    """A stream handler whose batch-progress records drive a bar instead of adding lines."""

    def __init__(self, stream: TextIO):
        super().__init__(stream)
        self._bar: tqdm | None = None
        self._stage: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        event = record.msg if isinstance(record.msg, dict) else {}  # structlog's event dict
        try:
            if event.get("event") == PROGRESS_EVENT and isinstance(event.get("total_steps"), int):
                self._advance(event)
            elif self._bar is not None:
                self._bar.clear()  # the line goes where the bar was; the bar is drawn again below it
                self.stream.write(self.format(record) + self.terminator)
                self.flush()
                self._bar.refresh()
            else:
                super().emit(record)
        except Exception:
            self.handleError(record)

    def _advance(self, event: dict[str, Any]) -> None:
        stage = event.get("stage")
        if self._bar is None or stage != self._stage:
            self._finish_bar()  # the finished stage's bar stays on screen, one line
            self._stage = stage
            self._bar = tqdm(
                total=event["total_steps"], initial=0, desc=f"stage {stage}", file=self.stream, bar_format=BAR_FORMAT,
                dynamic_ncols=True, leave=True, mininterval=0,
            )
        self._bar.n = event.get("step") or 0
        self._bar.set_postfix_str(postfix(event), refresh=False)
        self._bar.refresh()

    def _finish_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.acquire()
        try:
            self._finish_bar()
        finally:
            self.release()
        super().close()


def postfix(event: dict[str, Any]) -> str:
    """epoch, loss, samples/s and ETA of a progress record, as far as it has them."""
    parts = [f"epoch {event.get('epoch')}/{event.get('epochs')}"]
    loss, rate, eta = event.get("loss"), event.get("samples_per_second"), event.get("eta")
    if isinstance(loss, (int, float)):
        parts.append(f"loss {loss:.5f}")
    if isinstance(rate, (int, float)):
        parts.append(f"{rate:.1f} samples/s")
    if eta:
        parts.append(f"ETA {eta}")
    return ", ".join(parts)
