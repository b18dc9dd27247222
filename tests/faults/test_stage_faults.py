"""Faults in a running pipeline (issue 7): a worker killed mid-scan, a worker gone for good, a stage that
raises on one message, a detector that stops mid-scan. Each test counts: frames in = frames accounted."""

from __future__ import annotations

import os
import signal

import pytest
from fault_rig import BATCH_SIZE, SCAN_END_TIMEOUT_S, FaultRig, fault_rig

from phasestream.runtime.accounting import frames_lost, unaccounted_frames

pytestmark = pytest.mark.slow


def _lost(end: dict) -> set[int]:
    return {i for first, last in end.get("frames_lost_indices", []) for i in range(first, last + 1)}


def _kill_when_busy(rig: FaultRig, label: str, frames: int) -> None:
    """SIGKILL ``label`` once it has received ``frames`` frames: it then holds a queue of batches."""
    rig.wait_for(lambda e: e["sender"] == label and e.get("frames_received", 0) >= frames)
    os.kill(rig.launcher.workers[label].process.pid, signal.SIGKILL)


def test_a_worker_killed_mid_scan_is_restarted_and_what_it_held_is_lost_by_index() -> None:
    n, half = 400, 200
    # A restarted worker must be back before the collector gives up on its ScanEnd; on a loaded 2-core
    # machine starting a Python process can take seconds, so this test waits longer than the others.
    with fault_rig({"delay_s": 0.02}, scan_end_timeout_s=20.0) as rig:
        scan = rig.new_scan("killed", n)
        messages = scan.data_messages()
        # The detector sends the first half, relay.0 dies holding part of it, and the second half comes
        # only once the launcher has restarted relay.0: that half must get through whole, partly through it.
        rig.emitter.emit_messages(messages[: 1 + half], scan.position_messages(0, half, end=False))
        _kill_when_busy(rig, "relay.0", frames=40)
        restarted = rig.wait_for(lambda e: e["event"] == "restarted")
        rig.emitter.emit_messages(messages[1 + half :], scan.position_messages(half))
        end = rig.scan_end(scan.scan_uid)
        collected = rig.collected(scan.scan_uid)
        dropped = rig.metric("collect.0", "phasestream_frames_dropped_total", reason="frames_lost")
        restarts = rig.metric("relay.0", "phasestream_worker_restarts_total")
        assert rig.launcher.workers["relay.0"].restarts == 1
        assert not [e for e in rig.events if e["event"] == "died"]

    assert restarted["sender"] == "relay.0" and restarted["code"] == -signal.SIGKILL
    assert restarts == 1
    lost = _lost(end)
    # Every frame is either collected (once) or lost by index; the killed worker held some of the first half.
    assert len(collected) == len(set(collected))
    assert set(collected) | lost == set(range(n)) and not set(collected) & lost
    assert lost and max(lost) < half
    assert set(range(half, n)) <= set(collected)
    accounting = end["accounting"]
    assert accounting["relay.0"]["restarted_mid_scan"] == 1
    assert accounting["relay.0"]["frames_sent"] > 0, "the restarted relay.0 took no frames of the second half"
    assert frames_lost(accounting) == accounting["collect.0"]["frames_lost"] == len(lost) == dropped
    assert unaccounted_frames(end["frames_sent"], accounting) == []
    assert any(str(min(lost)) in text for text in rig.logs("frames_lost"))


def test_a_worker_out_of_restarts_costs_its_frames_and_the_scan_closes_after_the_timeout() -> None:
    n = 40
    with fault_rig({"delay_s": 0.3}, max_restarts=0) as rig:
        scan = rig.new_scan("gone", n)
        rig.emitter.emit_messages(scan.data_messages(), scan.position_messages())
        _kill_when_busy(rig, "relay.0", frames=BATCH_SIZE)
        died = rig.wait_for(lambda e: e["event"] == "died")
        end = rig.scan_end(scan.scan_uid)
        collected = rig.collected(scan.scan_uid)

    assert died["sender"] == "relay.0"
    lost = _lost(end)
    assert set(collected) | lost == set(range(n)) and not set(collected) & lost
    assert len(lost) >= BATCH_SIZE
    accounting = end["accounting"]
    # relay.0's ScanEnd never came: the collector closed the scan after scan_end_timeout_s, counted.
    assert accounting["collect.0"]["scan_ends_missing"] == 1
    assert "relay.0" not in accounting
    assert accounting["collect.0"]["frames_lost"] == len(lost)
    assert unaccounted_frames(end["frames_sent"], accounting) == []
    assert any(f"scan_end_timeout_s={SCAN_END_TIMEOUT_S:g}" in t for t in rig.logs("scan_ends_missing"))


@pytest.fixture(scope="module")
def flaky_rig():
    with fault_rig({"fail_on_index": 10}) as rig:
        yield rig


def test_a_stage_that_raises_on_one_message_goes_on_with_the_next(flaky_rig: FaultRig) -> None:
    rig, n = flaky_rig, 40
    scan = rig.new_scan("raises", n)
    rig.emitter.emit_messages(scan.data_messages(), scan.position_messages())
    end = rig.scan_end(scan.scan_uid)
    failed_batch = set(range(8, 12))  # batches of 4: the one holding frame 10

    assert sorted(rig.collected(scan.scan_uid)) == sorted(set(range(n)) - failed_batch)
    accounting = end["accounting"]
    rejected = [accounting[f"relay.{w}"].get("rejected_internal_error", 0) for w in (0, 1)]
    assert sorted(rejected) == [0, len(failed_batch)]
    worker = rejected.index(len(failed_batch))
    rejections = rig.metric(f"relay.{worker}", "phasestream_messages_rejected_total", reason="internal_error")
    assert rejections == 1
    assert frames_lost(accounting) == 0
    assert unaccounted_frames(end["frames_sent"], accounting) == []
    assert any("injected fault on frame 10" in t for t in rig.logs("internal_error"))


def test_a_detector_that_stops_mid_scan_is_closed_with_what_arrived(flaky_rig: FaultRig) -> None:
    """The ingest stage's ``stalled_scan_timeout_s`` (tests/test_ingest.py) seen through the whole chain."""
    rig, n, sent = flaky_rig, 20, 8  # frame 10, which this relay fails on, is never sent
    scan = rig.new_scan("stalled", n)
    rig.emitter.emit_messages(scan.data_messages(sent=sent, end=False), scan.position_messages())
    end = rig.scan_end(scan.scan_uid)

    assert sorted(rig.collected(scan.scan_uid)) == list(range(sent))
    accounting = end["accounting"]
    assert accounting["ingest.0"]["closed_by_timeout"] == 1
    assert accounting["ingest.0"]["missing_frames"] == n - sent
    assert end["frames_sent"] == n
    assert frames_lost(accounting) == 0
    assert unaccounted_frames(end["frames_sent"], accounting) == []
