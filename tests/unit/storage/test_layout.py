"""The run folder's paths: the one place that spells them."""

from __future__ import annotations

from job.storage import Layout


def test_checkpoint_names_sort_by_step():
    names = [Layout.checkpoint_name(step) for step in (9, 100, 10, 1200)]
    assert sorted(names) == [Layout.checkpoint_name(s) for s in (9, 10, 100, 1200)]
    assert Layout.checkpoint_name(1200) == "step-00001200"


def test_each_stage_has_its_folders_and_status_finds_them_by_number():
    assert Layout.stage_numbered(1) is Layout.tokenizer and Layout.stage_numbered(2) is Layout.transformer
    assert Layout.stage_numbered(None) is Layout.tokenizer and Layout.stage_numbered(7) is Layout.tokenizer
    assert Layout.tokenizer.latest == "checkpoints/latest.json"  # the run-folder contract's names
    assert Layout.transformer.checkpoint_manifest("step-00000001") == "stage2/checkpoints/step-00000001/manifest.json"
    assert Layout.attempt_of_log("attempt-012.jsonl") == 12 and Layout.attempt_of_log("notes.txt") is None
