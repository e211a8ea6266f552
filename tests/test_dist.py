"""The collectives' single-process behaviour and how failures are classified and reported."""

import torch

from softprompt import dist


def test_collectives_are_identities_in_one_process():
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce_sum(t), t)
    assert dist.any_rank(False, torch.tensor(True), 0) == [False, True, False]
    assert dist.gather_objects({"a": 1}) == [{"a": 1}]


def test_communication_errors_are_told_apart_from_causes():
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2452")
    timeout = RuntimeError("[../gloo/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete")
    assert dist.is_communication_error(gloo) and dist.is_communication_error(timeout)
    assert not dist.is_communication_error(ValueError("boom")) and not dist.is_communication_error(
        RuntimeError("shape mismatch"))


def test_report_without_a_process_group_is_the_message():
    assert dist.report(ValueError("x"), "bad input") == ["bad input"]


def test_free_port_is_below_the_ephemeral_range():
    assert 10000 <= dist.free_port() < 20000
