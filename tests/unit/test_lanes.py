"""lossd_client.lanes.Lanes: the queue and streams of one evaluate_many, without the I/O."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from lossd_client.lanes import MAX_RESENDS, Lanes


@dataclass
class Req:
    id: str


def reqs(*ids: str) -> list[Req]:
    return [Req(i) for i in ids]


def two_per_message(batch: list) -> bool:
    return len(batch) >= 2


class GaveWay(Exception):
    pass


def ids(batch: list | None) -> list[str] | None:
    return None if batch is None else [r.id for r in batch]


def test_streams_take_what_is_queued_a_message_at_a_time():
    lanes = Lanes(2)
    assert lanes.take(0, two_per_message) is None  # nothing queued: wait
    for r in reqs("0", "1", "2"):
        assert not lanes.put(r)  # streams are open: none asked for
    assert ids(lanes.take(1, two_per_message)) == ["0", "1"]
    assert ids(lanes.take(0, two_per_message)) == ["2"]
    assert lanes.carrying and not lanes.queued
    lanes.answered(reqs("1", "0", "2"))
    assert not lanes.carrying


def test_the_least_loaded_stream_is_the_oldest_of_those_carrying_fewest():
    lanes = Lanes(3)
    assert lanes.least_loaded() == 0
    for r in reqs("0", "1", "2"):
        lanes.put(r)
    lanes.take(0, two_per_message)
    lanes.take(1, two_per_message)
    assert lanes.least_loaded() == 2
    lanes.answered(reqs("0", "1"))
    assert lanes.least_loaded() == 0


def test_a_stream_that_gave_way_hands_back_what_it_carried_unanswered_in_order_to_the_front():
    lanes = Lanes(2)
    for r in reqs("0", "1", "2", "3", "4"):
        lanes.put(r)
    assert ids(lanes.take(0, two_per_message)) == ["0", "1"]
    assert ids(lanes.take(1, two_per_message)) == ["2", "3"]
    lanes.answered(reqs("0"))
    lanes.gave_way(0, GaveWay())
    assert lanes.open == [1]
    assert lanes.take(0, two_per_message) == []  # its iterator ends
    assert ids(lanes.take(1, two_per_message)) == ["1", "4"]  # "1" again, before what was queued
    lanes.answered(reqs("2", "3"))
    lanes.gave_way(1, GaveWay())
    assert ids(lanes.take(1, two_per_message)) == []
    assert lanes.wanted() == 2  # requests wait and no stream is open: a new one
    assert ids(lanes.take(2, two_per_message)) == ["1", "4"]


def test_a_request_sent_again_too_often_raises_the_give_way():
    lanes = Lanes(1)
    lanes.put(Req("0"))
    for lane in range(MAX_RESENDS):
        assert ids(lanes.take(lane, two_per_message)) == ["0"]
        lanes.gave_way(lane, GaveWay())
        lanes.ended(lane)
        assert lanes.wanted() == lane + 1
    assert ids(lanes.take(MAX_RESENDS, two_per_message)) == ["0"]
    with pytest.raises(GaveWay):
        lanes.gave_way(MAX_RESENDS, GaveWay())


def test_an_answer_resets_the_count_of_times_sent_again():
    lanes = Lanes(1)
    lanes.put(Req("0"))
    for lane in range(MAX_RESENDS):
        lanes.take(lane, two_per_message)
        lanes.gave_way(lane, GaveWay())
        lanes.wanted()
    lanes.take(MAX_RESENDS, two_per_message)
    lanes.answered(reqs("0"))
    lanes.put(Req("1"))
    lanes.take(MAX_RESENDS, two_per_message)
    lanes.gave_way(MAX_RESENDS, GaveWay())  # "1" for the first time: no raise
    assert lanes.queued


def test_a_new_stream_is_asked_for_once_only_when_requests_wait_and_none_is_open():
    lanes = Lanes(1)
    lanes.gave_way(0, GaveWay())  # carried nothing: nothing to send, no stream wanted
    assert lanes.wanted() is None
    assert lanes.put(Req("0"))  # no stream open: ask
    assert not lanes.put(Req("1"))  # asked already
    assert lanes.wanted() == 1
    assert lanes.wanted() is None  # one is open
    assert not lanes.put(Req("2"))


def test_streams_end_once_the_source_has_ended_and_nothing_is_queued_and_the_call_once_all_is_answered():
    lanes = Lanes(2)
    lanes.put(Req("0"))
    lanes.end()
    assert ids(lanes.take(0, two_per_message)) == ["0"]
    assert lanes.take(1, two_per_message) == []
    assert lanes.take(0, two_per_message) == []
    assert lanes.open == []
    lanes.ended(1)
    assert not lanes.done  # "0" unanswered, stream 0's call not over
    lanes.answered(reqs("0"))
    assert not lanes.done
    lanes.ended(0)
    assert lanes.done


def test_what_a_stream_carried_after_the_source_ended_goes_on_a_new_stream():
    lanes = Lanes(1)
    lanes.put(Req("0"))
    lanes.end()
    lanes.take(0, two_per_message)
    lanes.gave_way(0, GaveWay())
    lanes.ended(0)
    assert not lanes.done
    lane = lanes.wanted()
    assert lane == 1 and ids(lanes.take(lane, two_per_message)) == ["0"]
    assert lanes.take(lane, two_per_message) == []
    lanes.answered(reqs("0"))
    lanes.ended(lane)
    assert lanes.done


def test_paused_streams_end_once_they_have_sent_what_is_queued_and_a_new_one_is_asked_for_after():
    lanes = Lanes(2)
    lanes.put(Req("0"))
    lanes.pause()
    assert ids(lanes.take(0, two_per_message)) == ["0"]  # what is queued still goes
    assert lanes.take(0, two_per_message) == []
    assert lanes.take(1, two_per_message) == []
    assert lanes.open == [] and not lanes.done
    lanes.resume()
    assert lanes.put(Req("1"))  # no stream open: ask
    lane = lanes.wanted()
    assert lane == 2 and ids(lanes.take(lane, two_per_message)) == ["1"]
    assert lanes.take(lane, two_per_message) is None  # not paused: waits for the next request
