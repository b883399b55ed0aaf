"""Where a run stands: the train state's round trip and its check that an epoch saw every sample once."""

from __future__ import annotations

import numpy as np

from job.checkpoints.train_state import TrainState, sample_digest
from job.training.order import epoch_order


def test_the_state_round_trips_through_its_dict():
    state = TrainState(step=7, epoch=1, sample_in_epoch=16, metrics=[{"epoch": 1}], best={"checkpoint": "x", "val_loss": 1.0})
    again = TrainState()
    again.load_state_dict(state.state_dict())
    assert again == state and set(TrainState.keys()) == set(state.state_dict())


def test_an_epoch_is_complete_only_with_every_sample_exactly_once():
    state = TrainState()
    state.count_samples(np.array([3, 1]))
    state.count_samples(np.array([0, 2]))  # in any order, across resumes and ranks
    assert state.epoch_complete(4)
    twice = TrainState()
    twice.count_samples(np.array([0, 1, 1, 3]))  # sample 1 twice, sample 2 never
    assert not twice.epoch_complete(4)
    assert sample_digest(np.array([5, 9])) == sample_digest(np.array([9, 5]))
    state.start_next_epoch()
    assert (state.epoch, state.sample_in_epoch, state.epoch_sample_count) == (1, 0, 0)


def test_an_epoch_order_is_a_pure_function_of_seed_epoch_and_stage():
    first = epoch_order(0, 3, 50)
    assert np.array_equal(first, epoch_order(0, 3, 50)) and sorted(first) == list(range(50))
    assert not np.array_equal(first, epoch_order(0, 4, 50))
    assert not np.array_equal(first, epoch_order(0, 3, 50, (2,)))
