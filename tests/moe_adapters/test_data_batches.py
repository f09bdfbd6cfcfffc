"""Batches: padding with masked labels, and a resumable low-padding batch order."""

from __future__ import annotations

import random

from moe_adapters.data_batches import BucketBatcher, collate
from moe_adapters.data_tokenize import IGNORE_INDEX, Example


def test_collate_pads_and_masks():
    batch = collate([Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_bucket_batcher_low_padding_full_coverage_and_resume():
    lengths = [random.Random(i).randint(5, 200) for i in range(512)]
    batcher = BucketBatcher(lengths, batch_size=8, seed=0)
    epoch = [next(batcher) for _ in range(64)]
    assert sorted(i for b in epoch for i in b) == list(range(512))  # every example once per epoch
    padded = sum(len(b) * max(lengths[i] for i in b) for b in epoch)
    assert padded / sum(lengths) < 1.1  # random batches of 8 would pad ~1.6x here
    state = batcher.state_dict()
    expected = [next(batcher) for _ in range(70)]  # crosses into the next epoch
    other = BucketBatcher(lengths, batch_size=8, seed=0)
    other.load_state_dict(state)
    assert [next(other) for _ in range(70)] == expected
    assert [next(BucketBatcher(lengths, 8, seed=1)) for _ in range(1)] != [epoch[0]]
