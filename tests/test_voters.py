"""One partition, one voter (common/federated/voters.py), without Flower."""

from __future__ import annotations

import pytest

from common.federated.voters import VoterRoll


def test_the_first_node_seen_keeps_its_partition_across_rounds():
    roll = VoterRoll(num_partitions=3)
    assert roll.refusal(11, 0) is None
    assert roll.refusal(12, 1) is None
    reason = roll.refusal(99, 0)
    assert "partition 0" in reason and "node 11 holds" in reason
    assert roll.refusal(11, 0) is None  # the holder itself, a later round
    assert roll.holders == {0: 11, 1: 12}


@pytest.mark.parametrize("claim", [3, 4, 1000])
def test_a_partition_beyond_the_plan_is_refused(claim):
    roll = VoterRoll(num_partitions=3)
    reason = roll.refusal(7, claim)
    assert f"partition {claim}" in reason and "0..2" in reason and "min-available-nodes 3" in reason
    assert roll.holders == {}


def test_a_node_votes_for_one_partition_only():
    roll = VoterRoll(num_partitions=3)
    assert roll.refusal(5, 0) is None
    reason = roll.refusal(5, 2)
    assert "holds partition 0" in reason
    assert roll.holders == {0: 5}  # partition 2 stays free for its own node
    assert roll.refusal(6, 2) is None


def test_a_reply_without_a_partition_is_refused_where_the_server_has_no_record():
    assert "no partition-id" in VoterRoll(num_partitions=3).refusal(5, None)


def test_the_servers_record_decides_over_what_the_node_reports():
    roll = VoterRoll(num_partitions=2)
    registered = {21: 0, 22: 1}
    assert roll.refusal(21, 1, registered) is None  # counted as its registered partition 0
    assert roll.holders == {0: 21}
    assert "does not hold this node" in roll.refusal(23, 1, registered)
    assert roll.refusal(22, None, registered) is None


def test_no_plan_still_allows_one_voter_per_partition():
    roll = VoterRoll(num_partitions=0)
    assert roll.refusal(1, 500) is None
    assert "node 1 holds" in roll.refusal(2, 500)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_a_bad_plan_is_refused(bad):
    with pytest.raises(ValueError):
        VoterRoll(num_partitions=bad)
