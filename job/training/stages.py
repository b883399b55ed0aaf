"""The stages of a run (SPEC §7, §15): the tokenizer, then the masked token transformer over its
codes. Each stage has its own checkpoints, metrics and plots in the run folder, its own epochs
and batch size, and its own view of which config keys change its math."""

from __future__ import annotations

from dataclasses import dataclass

from job.config import MATH_SECTIONS, STAGE2_MATH_SECTIONS, Config, steps_per_epoch
from job.storage import Layout
from job.storage.layout import StageLayout


@dataclass(frozen=True)
class StagePlan:
    number: int
    name: str
    layout: StageLayout
    epochs: int
    batch_size: int
    math_sections: tuple[str, ...]
    order_stream: tuple[int, ...]  # keeps each stage's batch order its own (see epoch_order)

    def steps_per_epoch(self, cfg: Config) -> int:
        return steps_per_epoch(cfg, self.batch_size)

    def total_steps(self, cfg: Config) -> int:
        return self.steps_per_epoch(cfg) * self.epochs


def stage_plans(cfg: Config) -> list[StagePlan]:
    plans = [StagePlan(1, "tokenizer", Layout.tokenizer, cfg.train.epochs, cfg.train.batch_size, MATH_SECTIONS, ())]
    if cfg.stage2.epochs:
        plans.append(StagePlan(
            2, "transformer", Layout.transformer, cfg.stage2.epochs, cfg.stage2.batch_size, STAGE2_MATH_SECTIONS, (2,),
        ))
    return plans
