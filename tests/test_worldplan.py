"""Resuming on another world size: the rule (hpcft.worldplan) and the data layout that makes it exact
(hpcft.train.data.GlobalBatchSampler)."""
import itertools

import pytest

from hpcft.errors import SpecError
from hpcft.train.data import GlobalBatchSampler
from hpcft.worldplan import SavedRun, adapt, elastic_gaps

SAVED = SavedRun(step=5, epoch=0, samples_in_epoch=80, world_size=4, micro_batch=4, accum=1, total_steps=45,
                 strategy="fsdp", use_peft=False)


def test_accumulation_keeps_the_global_batch():
    for world, accum in ((4, 1), (2, 2), (1, 4)):
        plan = adapt(SAVED, world_size=world, micro_batch=4, accum=1, strategy="fsdp", use_peft=False)
        assert (plan.accum, plan.global_batch, plan.total_steps) == (accum, 16, 45)
    plan = adapt(SAVED, world_size=2, micro_batch=2, accum=7, strategy="ddp", use_peft=False)
    assert plan.accum == 4 and "world 4 -> 2 ranks" in plan.describe()
    assert not adapt(SAVED, world_size=4, micro_batch=4, accum=1, strategy="fsdp", use_peft=False).changed


def test_a_global_batch_that_cannot_be_kept_names_what_would_work():
    with pytest.raises(SpecError, match=r"train.resume: .*global batch of 16.* 3 ranks.*run on 1, 2, 4, 8, 16 ranks"):
        adapt(SAVED, world_size=3, micro_batch=1, accum=1, strategy="fsdp", use_peft=False)
    with pytest.raises(SpecError, match=r"set train.batch_size_training to 1, 2, 4"):
        adapt(SAVED, world_size=4, micro_batch=3, accum=1, strategy="fsdp", use_peft=False)


def test_incompatible_checkpoints_are_refused():
    with pytest.raises(SpecError, match="strategy fsdp and cannot be loaded by zero3"):
        adapt(SAVED, world_size=4, micro_batch=4, accum=1, strategy="zero3", use_peft=False)
    with pytest.raises(SpecError, match="use_peft: false"):
        adapt(SAVED, world_size=4, micro_batch=4, accum=1, strategy="fsdp", use_peft=True)


def layout(n, micro, accum, world, epoch=0, start=0):
    """step -> the micro-batch chunks of the whole world (fillers dropped), and each rank's micro count."""
    samplers = [GlobalBatchSampler(n, micro=micro, accum=accum, world=world, rank=r, seed=3) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch, start)
    counts = {len(s.steps) for s in samplers}
    assert len(counts) == 1  # every rank makes the same number of optimizer steps
    steps = []
    for k in range(counts.pop()):
        per_rank = [s.steps[k] for s in samplers]
        assert len({len(p) for p in per_rank}) == 1  # ... and of micro-steps in each
        steps.append(sorted(tuple(mb) for p in per_rank for mb in p if mb[0] >= 0))
        for p in per_rank:
            assert all(len(mb) == 1 and mb[0] < 0 for mb in p if mb[0] < 0)  # fillers are single masked rows
    return steps


@pytest.mark.parametrize("n", [1, 7, 16, 37, 100])
def test_every_example_once_per_epoch_and_the_same_chunks_on_any_world(n):
    ref = layout(n, micro=2, accum=4, world=1)
    ids = [i for step in ref for chunk in step for i in chunk]
    assert sorted(ids) == list(range(n))
    for accum, world in ((2, 2), (1, 4), (4, 1)):
        assert layout(n, micro=2, accum=accum, world=world) == ref
    assert layout(n, micro=2, accum=4, world=1, epoch=1) != ref or n == 1  # a new order each epoch


def test_resume_at_a_global_sample_continues_exactly_on_another_world():
    full = layout(37, micro=2, accum=1, world=4)
    for world, accum in itertools.product((1, 2, 4), (1,)):
        rest = layout(37, micro=2, accum=4 // world, world=world, start=16)
        assert rest == full[2:]


def test_node_ranges_whose_global_batch_a_restart_cannot_keep_are_found():
    gaps, fit = elastic_gaps(accum=2, counts=[2, 3])
    assert gaps == [(2, 3)] and fit == 6  # 3 -> 2 keeps 2x3=6 as 2x3; 2 -> 3 cannot keep 2x2=4
    assert elastic_gaps(accum=6, counts=[2, 3]) == ([], 6)
    assert elastic_gaps(accum=1, counts=[4]) == ([], 1)
    assert elastic_gaps(accum=1, counts=[1, 2, 3, 4])[1] == 12
