"""Duration-grouped batches: similar durations together, and an order that is a function of the epoch alone."""

from __future__ import annotations

import numpy as np

from speechlm.data.sampling import DurationGroupedSampler


def test_duration_grouped_sampler_is_a_function_of_the_epoch():
    lengths = np.random.default_rng(0).integers(500, 20_000, size=400).tolist()
    sampler = DurationGroupedSampler(4, lengths, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and sorted(first) == list(range(400)) and first != second

    def spread(order):  # mean duration range inside a batch of 4
        return np.mean([np.ptp([lengths[i] for i in order[k : k + 4]]) for k in range(0, 400, 4)])

    assert spread(first) < 0.2 * spread(list(range(400)))
