"""The loop's pure parts: the schedule, the data order and each rank's micro-batches."""

import pytest

from softprompt.dsconfig import BatchSizes
from softprompt.trainer import Schedule, epoch_order, micro_batches


def test_schedule_counts_full_global_batches_and_evaluates_at_epoch_ends():
    s = Schedule.build(n_train=100, global_batch=32, max_steps=0, epochs=2.0, eval_every=0)
    assert (s.steps_per_epoch, s.total_steps) == (3, 6)  # the last partial batch (4 examples) is dropped
    assert s.eval_steps == {3, 6}
    s = Schedule.build(100, 32, 0, 1.5, 0)
    assert s.total_steps == 5 and s.eval_steps == {3, 5}  # ceil(1.5 x 3); the last step always evaluates
    s = Schedule.build(100, 32, max_steps=7, epochs=2.0, eval_every=2)
    assert s.total_steps == 7 and s.eval_steps == {2, 4, 6, 7}  # --max_steps wins over --epochs
    with pytest.raises(ValueError, match=r"training split \(10 examples\) is smaller than one global batch \(32\)"):
        Schedule.build(10, 32, 0, 1.0, 0)


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=1, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, 1, 0) and a != epoch_order(50, 1, 1) and a != epoch_order(50, 2, 0)


@pytest.mark.parametrize("world, micro", [(1, 4), (2, 4), (4, 2), (8, 1), (2, 1)])
def test_every_example_of_a_step_lands_once_whatever_the_split(world, micro):
    """A step takes the next global batch of the epoch's order; ranks x accumulation share it exactly, so
    the examples per optimizer step do not depend on the world size (2 ranks reproduce 1 rank)."""
    order = epoch_order(100, seed=0, epoch=0)
    g = 8
    sizes = BatchSizes(g, micro, g // (micro * world), world)
    for step in range(3):
        parts = [micro_batches(order, step, sizes, rank) for rank in range(world)]
        assert all(len(p) == sizes.grad_accum and all(len(mb) == micro for mb in p) for p in parts)
        taken = sorted(i for p in parts for mb in p for i in mb)
        assert taken == sorted(order[step * g:(step + 1) * g])
    # rank r's k-th micro-batch is slice (k x world + r) of the step's indices
    assert micro_batches(order, 0, sizes, world - 1)[-1] == order[g - micro:g]
