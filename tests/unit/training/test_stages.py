"""The stages as data: which ones a config trains, their schedules from their own config keys, and
the models each one rebuilds and probes."""

from __future__ import annotations

import pytest
import torch

from job.config import build_config, get_value, set_value, steps_per_epoch
from job.storage import Layout
from job.training.stages import STAGES, TOKENIZER, TRANSFORMER, CheckFailed, stage_numbered, stages_of


def test_a_run_trains_the_tokenizer_then_the_transformer_unless_stage_two_has_no_epochs():
    cfg = build_config("smoke")
    assert [s.name for s in stages_of(cfg)] == ["tokenizer", "transformer"]
    set_value(cfg, "stage2.epochs", 0)
    assert stages_of(cfg) == [TOKENIZER]
    assert [stage_numbered(n) for n in (1, 2)] == list(STAGES)


def test_each_stage_reads_its_schedule_from_its_own_keys():
    cfg = build_config("smoke")
    for stage in STAGES:
        for key in (stage.epochs_key, stage.batch_size_key, stage.lr_key, stage.warmup_steps_key):
            get_value(cfg, key)  # every key the stage names exists
        assert stage.total_steps(cfg) == steps_per_epoch(cfg, stage.batch_size(cfg)) * stage.epochs(cfg)
    set_value(cfg, "stage2.batch_size", 4)
    assert TRANSFORMER.batch_size(cfg) == 4 and TOKENIZER.batch_size(cfg) == cfg.train.batch_size
    assert (TOKENIZER.layout, TRANSFORMER.layout) == Layout.stages
    assert TRANSFORMER.learns_from is TOKENIZER and TOKENIZER.learns_from is None
    assert TOKENIZER.order_stream != TRANSFORMER.order_stream  # each stage's batch order is its own


def test_each_stage_rebuilds_its_model_and_its_forward_check_passes_and_fails():
    cfg = build_config("smoke")
    tokenizer = TOKENIZER.trained_model(TOKENIZER.initial_model(cfg, None).state_dict(), cfg, None)
    videos = torch.rand(2, 1, cfg.data.frames, cfg.data.height, cfg.data.width) * 0.1
    labels = torch.tensor([0, 1])
    assert "finite video" in TOKENIZER.forward_check(tokenizer, videos, labels, None)
    transformer = TRANSFORMER.trained_model(TRANSFORMER.initial_model(cfg, tokenizer).state_dict(), cfg, tokenizer)
    assert "finite logits" in TRANSFORMER.forward_check(transformer, videos, labels, tokenizer)
    with torch.no_grad():
        transformer.head.bias.fill_(float("nan"))
    with pytest.raises(CheckFailed, match="NaN"):
        TRANSFORMER.forward_check(transformer, videos, labels, tokenizer)
