"""`train` on a terminal (a pseudo-terminal drawn on a pyte screen): one progress bar per stage,
updated in place, with the log's other lines above it; the run's log file stays JSON lines."""

from __future__ import annotations

import re

import pexpect
import pyte
import pytest

from tests.helpers import ROOT, job_command, job_env

pytestmark = pytest.mark.timeout(240)

COLUMNS, ROWS = 120, 30
BAR = re.compile(r"^stage (\d): +(\d+)%\|.*\| step (\d+)/(\d+), epoch \d+/\d+")


def bar_lines(screen: pyte.Screen) -> list[re.Match]:
    return [m for line in screen.display if (m := BAR.match(line.rstrip()))]


def test_a_terminal_shows_one_bar_per_stage_that_advances_in_place(tmp_path):
    command = job_command("train", "--preset", "smoke", "--run-uri", str(tmp_path / "run"),
                          "--set", "train.epochs=2", "--set", "stage2.epochs=1")
    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    child = pexpect.spawn(command[0], command[1:], cwd=str(ROOT), env=job_env(), dimensions=(ROWS, COLUMNS))
    steps_seen: dict[str, list[int]] = {}
    raw = b""
    while True:
        try:
            chunk = child.read_nonblocking(65536, timeout=200)
        except pexpect.EOF:
            break
        raw += chunk
        stream.feed(chunk)
        bars = bar_lines(screen)
        current = [m for m in bars if m.group(1) == bars[-1].group(1)] if bars else []
        assert len(current) <= 1, "\n".join(screen.display)  # never two bars of one stage on screen
        if current:
            steps_seen.setdefault(current[0].group(1), []).append(int(current[0].group(3)))
    child.close()
    assert child.exitstatus == 0, raw.decode(errors="replace")[-3000:]

    for stage in ("1", "2"):
        steps = steps_seen[stage]
        assert steps == sorted(steps) and len(set(steps)) >= 3, steps  # the bar advanced, never back
    final = bar_lines(screen)
    assert final and final[-1].group(1) == "2" and final[-1].group(3) == final[-1].group(4)  # stage 2 at its end
    shown = [line.rstrip() for line in screen.display if line.strip()]
    assert BAR.match(shown[-1])  # the bar is the last line: the log's lines are printed above it
    assert any("checkpoint.saved" in line for line in shown[:-1])
    text = raw.decode(errors="replace")
    assert "train.progress" not in text  # progress moves the bar, it adds no lines
    log = (tmp_path / "run" / "logs" / "attempt-001.jsonl").read_text()
    assert log.startswith("{") and log.count('"event": "train.progress"') >= 5  # the file keeps every record as JSON
