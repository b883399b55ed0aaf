"""verify (SPEC §11): a sound run passes, also after kills and resumes and from a bucket with an
empty cache; each single fault planted in a copy of a sound run fails the check named for it,
and only that check."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from job.config import build_config
from job.modes.verify import run as run_verify
from job.storage import RunStore
from tests.helpers import ROOT, checkpoint_state, job_command, job_env, log_events, rewrite_state, run_job

pytestmark = pytest.mark.timeout(300)

PER_CHECKPOINT = ("manifest", "safe_load", "forward", "cadence", "weights_changed", "metrics_history")
CHECK_KINDS = {*PER_CHECKPOINT, "latest", "checkpoints"}


def verify(run: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``python -m job verify`` on a local run folder; return the process and its report."""
    result = run_job("verify", "--preset", "smoke", "--run-uri", str(run))
    report_path = run / "verify" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return result, report


def failed_checks(report: dict) -> dict[str, str]:
    return {check["name"]: check["detail"] for check in report["checks"] if not check["passed"]}


def committed(run: Path) -> list[str]:
    return sorted(p.parent.name for p in (run / "checkpoints").glob("step-*/manifest.json"))


def checkpoint_folder(run: Path, name: str) -> Path:
    return run / "checkpoints" / name


def rewrite_checkpoint_file(run: Path, name: str, filename: str, data: bytes, **manifest_fields: int) -> None:
    """Replace one file of a checkpoint and update its manifest to match, so that the manifest
    check cannot see the change and only the check aimed at it can."""
    folder = checkpoint_folder(run, name)
    (folder / filename).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][filename] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest.update(manifest_fields)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def edit_state(run: Path, name: str, edit: Callable[[dict], None], **manifest_fields: int) -> None:
    state = checkpoint_state(checkpoint_folder(run, name))
    edit(state)
    rewrite_state(checkpoint_folder(run, name), state, **manifest_fields)


@pytest.fixture
def run(smoke_baseline: Path, tmp_path: Path) -> Path:
    """A private copy of the sound smoke run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(smoke_baseline, copy)
    assert len(committed(copy)) >= 2, "the faults below need an older and a newer checkpoint"
    return copy


def test_a_sound_run_passes_every_named_check(run):
    result, report = verify(run)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert report["passed"] is True and not failed_checks(report)
    names = [check["name"] for check in report["checks"]]
    assert {name.split()[0] for name in names} == CHECK_KINDS
    stage2 = [f"stage2/{name}" for name in committed(run / "stage2")]
    assert stage2 and report["checkpoints"] == committed(run) + stage2  # both stages, oldest first
    for checkpoint in committed(run) + stage2:
        assert {f"{kind} {checkpoint}" for kind in PER_CHECKPOINT} <= set(names)
    assert {"metrics_history metrics.jsonl", "metrics_history stage2/metrics.jsonl", "latest stage2"} <= set(names)
    assert report["created_at"]
    done = [e for e in log_events(result.stdout) if e["event"] == "verify.done"]
    assert done and done[0]["passed"] is True and done[0]["failed"] == 0
    table = [line for line in result.stdout.splitlines() if not line.startswith("{")]
    for name in names:
        assert any(line.startswith(name) and " PASS " in line for line in table), name


def flip_a_byte_in_older_weights(run: Path) -> dict[str, str]:
    older = committed(run)[0]
    weights = checkpoint_folder(run, older) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    return {f"manifest {older}": "sha256"}


def drop_older_manifest(run: Path) -> dict[str, str]:
    older = committed(run)[0]
    (checkpoint_folder(run, older) / "manifest.json").unlink()
    return {f"manifest {older}": "no manifest.json"}


def make_a_step_go_backwards(run: Path) -> dict[str, str]:
    """The older checkpoint claims a step after the newer one's, in its state and manifest alike."""
    older, newer = committed(run)[-2:]
    later_step = int(newer.removeprefix("step-")) + 6
    edit_state(run, older, lambda state: state.update(step=later_step), step=later_step)
    return {f"cadence {older}": "folder's name", f"cadence {newer}": "goes backwards"}


def leave_weights_unchanged(run: Path) -> dict[str, str]:
    older, newer = committed(run)[-2:]
    weights = (checkpoint_folder(run, older) / "model.safetensors").read_bytes()
    rewrite_checkpoint_file(run, newer, "model.safetensors", weights)
    # Stage 2 learned from the newest tokenizer: its weights are no longer those, and it says so.
    stage2 = committed(run / "stage2")
    return {
        f"weights_changed {newer}": f"equals {older}",
        **{f"forward stage2/{name}": "differ from the sha256" for name in stage2},
        f"weights_changed stage2/{stage2[0]}": "differ from the sha256",
    }


def edit_metrics(run: Path, change: Callable[[list[dict]], list[dict]]) -> None:
    """Change the epoch history in the newest checkpoint and in metrics.jsonl alike."""
    newest = committed(run)[-1]
    edit_state(run, newest, lambda state: state.update(metrics=change(state["metrics"])))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in change(records)))


def drop_an_epoch_from_metrics(run: Path) -> dict[str, str]:
    edit_metrics(run, lambda records: [r for r in records if r["epoch"] != 2])
    return {f"metrics_history {committed(run)[-1]}": "epoch 2 missing",
            "metrics_history metrics.jsonl": "epoch 2 missing"}


def repeat_an_epoch_in_metrics(run: Path) -> dict[str, str]:
    edit_metrics(run, lambda records: [*records[:2], records[1], *records[2:]])
    return {f"metrics_history {committed(run)[-1]}": "epoch 2 repeated",
            "metrics_history metrics.jsonl": "epoch 2 repeated"}


def plant_a_pickle(run: Path) -> dict[str, str]:
    """A file the job never reads, but a pickle has no business in a checkpoint."""
    older = committed(run)[0]
    (checkpoint_folder(run, older) / "extra.pkl").write_bytes(pickle.dumps({"weights": [1.0]}))
    return {f"safe_load {older}": "extra.pkl"}


def name_a_file_outside_the_folder(run: Path) -> dict[str, str]:
    """A manifest entry for ../../x whose hash matches the file really there: only the rule that
    a manifest names plain files of its own folder catches it."""
    older = committed(run)[0]
    (run / "x").write_bytes(b"planted")
    manifest_path = checkpoint_folder(run, older) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["../../x"] = {"sha256": hashlib.sha256(b"planted").hexdigest(), "size": 7}
    manifest_path.write_text(json.dumps(manifest))
    return {f"manifest {older}": "not a plain file"}


FAULTS = [
    name_a_file_outside_the_folder, flip_a_byte_in_older_weights, drop_older_manifest, make_a_step_go_backwards, leave_weights_unchanged,
    drop_an_epoch_from_metrics, repeat_an_epoch_in_metrics, plant_a_pickle,
]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.__name__)
def test_a_single_fault_fails_its_named_check_only(run, fault, capsys):
    """In this process (the function the command line calls): a subprocess spends some 4 s on
    imports per fault, which would double this file's run time. The next test covers the command
    line's side (exit code, log event, table)."""
    expected = fault(run)
    passed = run_verify(build_config("smoke"), RunStore(str(run)))
    report = json.loads((run / "verify" / "report.json").read_text())
    assert passed is False and report["passed"] is False
    failed = failed_checks(report)
    assert set(failed) == set(expected), failed
    for name, words in expected.items():
        assert words in failed[name], (name, failed[name])
    table = capsys.readouterr().out.splitlines()
    for name in expected:
        assert any(line.startswith(name) and " FAIL " in line for line in table), name


def test_the_command_exits_1_and_shows_the_failed_check(run):
    expected = flip_a_byte_in_older_weights(run)
    result, report = verify(run)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    assert set(failed_checks(report)) == set(expected)
    done = [e for e in log_events(result.stdout) if e["event"] == "verify.done"]
    assert done and done[0]["passed"] is False and done[0]["failed"] == 1
    (name,) = expected
    assert any(line.startswith(name) and " FAIL " in line for line in result.stdout.splitlines())


def test_a_folder_without_checkpoints_fails_clearly(tmp_path):
    result, report = verify(tmp_path / "nothing-here")
    assert result.returncode == 1
    assert set(failed_checks(report)) == {"checkpoints"}
    assert "no checkpoint" in failed_checks(report)["checkpoints"]


def train_until_killed(run: Path, after_saves: int) -> None:
    """Start train and SIGKILL it as soon as it has logged ``after_saves`` checkpoints."""
    proc = subprocess.Popen(
        job_command("train", "--preset", "smoke", "--run-uri", str(run)),
        cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    saves = 0
    with proc.stdout:
        for line in proc.stdout:
            saves += '"checkpoint.saved"' in line
            if saves >= after_saves:
                proc.send_signal(signal.SIGKILL)
                break
    assert proc.wait(timeout=60) == -signal.SIGKILL, "train ended before it could be killed"


def test_a_run_killed_and_resumed_passes(tmp_path):
    run = tmp_path / "run"
    train_until_killed(run, after_saves=8)  # into the second epoch
    finished = run_job("train", "--preset", "smoke", "--run-uri", str(run))
    assert finished.returncode == 0, finished.stderr
    assert json.loads((run / "progress.json").read_text())["attempt"] == 2
    result, report = verify(run)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert report["passed"] is True


def test_the_bucket_is_the_runs_truth_for_verify_a_resume_heals_it_and_a_cache_of_another_run_is_set_aside(s3, tmp_path):
    """A bucket run verifies from an empty cache; bit rot in the bucket fails verify on the host
    that trained (whose cache is sound) until a restart there heals the bucket; and once the
    bucket is wiped, that host's cache (of another run now) is moved aside, not resumed from."""
    env = job_env(XDG_CACHE_HOME=str(tmp_path / "xdg"))  # the default cache of this "host"
    on_the_host = ("--preset", "smoke", "--run-uri", s3.uri())
    trained = run_job("train", *on_the_host, env=env)
    assert trained.returncode == 0, trained.stderr
    empty_cache = tmp_path / "verify-cache"
    result = run_job("verify", *on_the_host, "--cache-dir", str(empty_cache))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    report = json.loads(s3.get("run/verify/report.json"))
    assert report["passed"] is True and report["checkpoints"]
    assert {check["name"].split()[0] for check in report["checks"]} == CHECK_KINDS

    newest = json.loads(s3.get("run/checkpoints/latest.json"))["checkpoint"]
    key = f"run/checkpoints/{newest}/model.safetensors"
    good = s3.get(key)
    s3.put(key, good[:-1] + bytes([good[-1] ^ 1]))  # a byte flipped in the bucket; the host's cache is sound
    rotten = run_job("verify", *on_the_host, env=env)
    assert rotten.returncode == 1, rotten.stdout[-3000:]
    failed = failed_checks(json.loads(s3.get("run/verify/report.json")))
    assert "sha256" in failed[f"manifest {newest}"] and s3.uri(f"run/checkpoints/{newest}/model.safetensors") in failed[
        f"manifest {newest}"]

    healed = run_job("train", *on_the_host, env=env)  # the run is complete: a start heals the bucket, trains nothing
    assert healed.returncode == 0, healed.stderr
    assert [e["files"] for e in log_events(healed.stdout) if e["event"] == "checkpoint.healed"] == [["model.safetensors"]]
    assert s3.get(key) == good
    assert run_job("verify", *on_the_host, env=env).returncode == 0

    first_run = json.loads(s3.get("run/lease.json"))["run_id"]
    s3.client.delete_objects(Bucket=s3.name, Delete={"Objects": [{"Key": k} for k in s3.keys("run/")]})  # wiped
    again = run_job("train", *on_the_host, "--set", "train.epochs=1", "--set", "stage2.epochs=0", env=env)
    assert again.returncode == 0, again.stderr
    events = log_events(again.stdout)
    assert [e["event"] for e in events if e["event"] in ("train.fresh_start", "train.resumed")] == ["train.fresh_start"]
    (moved,) = [Path(e["moved_to"]) for e in events if e["event"] == "cache.moved_aside"]
    assert moved.name.endswith(first_run) and (moved / "checkpoints" / "latest.json").exists()  # nothing lost
    assert not any(e["event"] == "checkpoint.reupload" for e in events)
    assert json.loads(s3.get("run/lease.json"))["run_id"] != first_run
