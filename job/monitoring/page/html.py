"""The run page as one HTML string: inline CSS, inline SVG charts, images as data: URLs and a few
lines of script that age the heartbeat in the reader's browser. Every string from the run folder
is escaped here; the Content-Security-Policy forbids any request but the page itself."""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

from job.monitoring.page.charts import finite, line_chart
from job.monitoring.page.facts import Attempt, Image, PageFacts, StageFacts
from job.monitoring.page.markdown import to_html
from job.monitoring.progress import format_duration
from job.monitoring.run_facts import LIVE_STATUSES
from job.storage import Layout

MIME = {"png": "image/png", "gif": "image/gif"}
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.4em;margin-bottom:.2em} h2{border-bottom:1px solid #ccc;margin-top:1.6em}
.muted{color:#666} .bad{color:#b00020;font-weight:600} .good{color:#137333;font-weight:600}
#status-line{font-size:1.15em;font-weight:600} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top} th{background:#f4f4f4}
figure{display:inline-block;margin:.3em 1em .3em 0;vertical-align:top} figcaption{font-size:.9em;color:#444}
svg.chart{background:#fff} svg .frame{fill:none;stroke:#999} svg text{font-size:11px;fill:#555}
.key{margin-left:.8em} .key i{display:inline-block;width:10px;height:10px;margin-right:3px}
img{max-width:100%} img.video{width:128px;image-rendering:pixelated} img.strip{max-width:500px} img.picture{max-width:540px}
img.eval{max-width:400px} details{margin:.5em 0}
"""

SCRIPT = """
const run = JSON.parse(document.getElementById("run-data").textContent);
function shown(s){s=Math.max(0,Math.round(s));const h=Math.floor(s/3600),m=Math.floor(s%3600/60),x=s%60;
  return (h?h+"h":"")+(h?String(m).padStart(2,"0"):m)+"m"+String(x).padStart(2,"0")+"s";}
function beat(){
  const at = Date.parse(run.heartbeat_at || "");
  const health = document.getElementById("health"), heart = document.getElementById("heartbeat");
  if (!run.live) return;
  if (isNaN(at)) { health.textContent = "STALE: no readable heartbeat"; health.className = "bad"; return; }
  const age = (Date.now() - at) / 1000;
  heart.textContent = "heartbeat " + (age < 0 ? "in the future by " + shown(-age) : shown(age) + " ago") +
    " (" + run.heartbeat_at + "), by this computer's clock: if its clock is off, so is this age";
  const stale = age > run.stale_after;
  health.textContent = stale ? "STALE: the run says " + run.status + " but has not beaten for " + shown(age) +
    " (limit " + shown(run.stale_after) + "); the job is probably dead or hung, or this page is old" : "healthy";
  health.className = stale ? "bad" : "good";
}
beat(); setInterval(beat, 1000);
"""


def render(facts: PageFacts) -> str:
    progress = facts.progress or {}
    status = progress.get("status")
    live = status in LIVE_STATUSES
    data = {"status": _str(status), "heartbeat_at": _str(progress.get("heartbeat_at")), "live": live,
            "stale_after": facts.stale_after}
    sections = [
        f"<h1>MAGVIT run {escape(facts.uri)}</h1>",
        f'<p class="muted">page written {escape(facts.written_at.isoformat(timespec="seconds"))} from the run folder '
        f"alone; it changes only when the job or <code>status --html</code> writes it again</p>",
        status_section(progress, live),
        notes_section(facts.notes),
        *[stage_section(stage, progress) for stage in facts.stages],
        attempts_section(facts.attempts),
        verify_section(facts.verify),
        evaluation_section(facts),
        gallery("Samples", "samples", facts.samples, "video", f"run <code>sample</code> to make them ({Layout.samples}/)"),
        gallery("Predictions", "predictions", facts.predictions, "strip",
                f"run <code>predict</code> to make them ({Layout.predictions}/)"),
        config_section(facts.config),
    ]
    # "<" as \\u003c: nothing in the data can close the script element it sits in.
    payload = json.dumps(data).replace("<", "\\u003c")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        f"<title>{escape(_str(status) or 'run')}: {escape(facts.uri)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(sections)
        + f'\n<script type="application/json" id="run-data">{payload}</script><script>{SCRIPT}</script>'
        "\n</body></html>\n"
    )


def status_section(progress: dict[str, Any], live: bool) -> str:
    if not progress:
        return '<section id="status"><h2>Status</h2><p id="status-line" class="bad">unknown: no readable ' \
               f'{Layout.progress}</p><p id="health"></p><p id="heartbeat"></p></section>'
    status = _str(progress.get("status")) or repr(progress.get("status"))
    final = {"completed": "good"}.get(status, "" if live else "bad")
    error = progress.get("error")
    return (
        '<section id="status"><h2>Status</h2>'
        f'<p id="status-line">{escape(status_line(progress))}</p>'
        f'<p id="health" class="{final}">{"" if live else escape(status)}</p>'
        f'<p id="heartbeat" class="muted">heartbeat at {escape(str(progress.get("heartbeat_at")))}'
        f'{"" if live else " (the run is not running: no age to watch)"}</p>'
        + (f'<p class="bad">error: {escape(str(error))}</p>' if error else "")
        + f'<p class="muted">started {escape(str(progress.get("started_at")))}, updated '
        f'{escape(str(progress.get("updated_at")))}, last checkpoint {escape(str(progress.get("last_checkpoint")))}'
        "</p></section>"
    )


def status_line(p: dict[str, Any]) -> str:
    """One line: status, stage, epoch, step, loss, speed, ETA, attempt."""
    parts = [str(p.get("status"))]
    if p.get("stage"):
        parts.append(f"stage {p['stage']}/{p.get('stages', '?')} ({p.get('stage_name', '-')})")
    parts.append(f"epoch {p.get('epoch')}/{p.get('epochs')}")
    step, total = p.get("step"), p.get("total_steps")
    percent = f" ({100 * step / total:.1f}%)" if finite(step) and finite(total) and total else ""
    parts.append(f"step {step}/{total}{percent}")
    if finite(p.get("loss")):
        parts.append(f"loss {p['loss']:.5f}")
    if finite(p.get("samples_per_second")):
        parts.append(f"{p['samples_per_second']:.1f} samples/s")
    if finite(p.get("eta_seconds")):
        parts.append(f"ETA {format_duration(p['eta_seconds'])}")
    parts.append(f"attempt {p.get('attempt')}")
    return " · ".join(parts)


def notes_section(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return f'<section id="notes"><h2>Missing or unreadable</h2><ul>{items}</ul></section>'


def stage_section(stage: StageFacts, progress: dict[str, Any]) -> str:
    current = " (current)" if progress.get("stage") == stage.number and progress.get("status") in LIVE_STATUSES else ""
    name = f" ({escape(str(progress['stage_name']))})" if progress.get("stage") == stage.number and \
        progress.get("stage_name") else ""
    checkpoint = stage.checkpoint
    if checkpoint:
        verify = checkpoint.get("verify")
        verdict = "not verified" if verify is None else ("verify passed" if verify["passed"] else "verify FAILED")
        newest = (f"newest committed checkpoint: <b>{escape(stage.layout.label + str(checkpoint['name']))}</b> "
                  f"(step {escape(str(checkpoint['step']))}, epoch {escape(str(checkpoint['epoch']))}, "
                  f"{escape(str(checkpoint['created_at']))}; {verdict})")
    else:
        newest = "no committed checkpoint yet"
    charts = (
        line_chart(f"stage {stage.number} loss", stage.epochs, ("train_loss", "val_loss"))
        + line_chart(f"stage {stage.number} learning rate", stage.epochs, ("lr",))
        if stage.epochs else f'<p class="muted">no epoch finished yet ({escape(stage.layout.metrics)})</p>'
    )
    picture = figure(stage.picture, "picture") if stage.picture else ""
    return (f'<section id="stage-{stage.number}" class="stage"><h2>Stage {stage.number}{name}{current}</h2>'
            f"<p>{newest}; {len(stage.epochs)} epoch(s) in {escape(stage.layout.metrics)}</p>{charts}{picture}</section>")


def attempts_section(attempts: list[Attempt]) -> str:
    if not attempts:
        return f'<section id="attempts"><h2>Attempts</h2><p class="muted">no attempt logs in {Layout.logs}/</p></section>'
    rows = "".join(
        f"<tr><td>{a.number}</td><td>{escape(a.started_at or '-')}</td>"
        f"<td>{'<br>'.join(escape(r) for r in a.resumed) or '-'}</td>"
        f'<td class="{"bad" if a.failed else ""}">{escape(a.end)}</td></tr>'
        for a in attempts
    )
    return ('<section id="attempts"><h2>Attempts</h2><table><thead><tr><th>attempt</th><th>started</th>'
            f"<th>resumed from</th><th>how it ended</th></tr></thead><tbody>{rows}</tbody></table></section>")


def verify_section(report: dict[str, Any] | None) -> str:
    if report is None:
        return f'<section id="verify"><h2>Verify</h2><p class="muted">not verified yet ({Layout.verify_report})</p></section>'
    checks = [c for c in report.get("checks") or [] if isinstance(c, dict)]
    passed = report.get("passed") is True
    failed = [c for c in checks if c.get("passed") is not True]
    rows = "".join(
        f'<tr><td>{escape(str(c.get("name")))}</td><td class="{"good" if c.get("passed") is True else "bad"}">'
        f'{"pass" if c.get("passed") is True else "FAIL"}</td><td>{escape(str(c.get("detail")))}</td></tr>'
        for c in failed + [c for c in checks if c not in failed]
    )
    verdict = f'<p class="{"good" if passed else "bad"}">verify {"passed" if passed else "FAILED"}: ' \
              f"{len(checks) - len(failed)} of {len(checks)} checks passed</p>"
    return (f'<section id="verify"><h2>Verify</h2>{verdict}<details{" open" if failed else ""}><summary>every check'
            f"</summary><table><tbody>{rows}</tbody></table></details></section>")


def evaluation_section(facts: PageFacts) -> str:
    if facts.eval_markdown is None:
        return f'<section id="evaluation"><h2>Evaluation</h2><p class="muted">not evaluated yet ({Layout.eval_markdown})</p></section>'

    def image(alt: str, target: str) -> str:
        found = facts.eval_images.get(target)
        return figure(found, "eval") if found else f'<p class="muted">[{escape(alt)}: {escape(target)} not found]</p>'

    return f'<section id="evaluation"><h2>Evaluation</h2>{to_html(facts.eval_markdown, image)}</section>'


def gallery(title: str, anchor: str, images: list[Image], css: str, missing: str) -> str:
    body = "".join(figure(i, css) for i in images) or f'<p class="muted">none yet: {missing}</p>'
    return f'<section id="{anchor}"><h2>{title}</h2>{body}</section>'


def figure(image: Image, css: str) -> str:
    if image.data is None:
        return f'<p class="muted">{escape(image.rel)}: not inlined, the page\'s image budget is spent</p>'
    source = f"data:{MIME.get(image.kind, 'image/png')};base64,{base64.b64encode(image.data).decode('ascii')}"
    return (f'<figure><img class="{css}" alt="{escape(image.caption)}" src="{source}">'
            f"<figcaption>{escape(image.caption)}</figcaption></figure>")


def config_section(config: dict[str, Any] | None) -> str:
    if config is None:
        return ""
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(json.dumps(v))}</td></tr>" for k, v in flat(config))
    return (f'<section id="config"><h2>Configuration</h2><details><summary>{Layout.config}</summary>'
            f"<table><tbody>{rows}</tbody></table></details></section>")


def flat(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in config.items():
        if isinstance(value, dict):
            rows += flat(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
