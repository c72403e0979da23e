"""The queue notice tells a queued worker group (its placement group pending) from one whose CPUs are
reserved and whose processes are still starting (the slow start a 2-core machine always shows)."""

from __future__ import annotations

import time

import pytest

from unislim.pipelines.cluster import QueueNotice


@pytest.mark.skipif(QueueNotice is None, reason="needs Ray Train V2's worker-group callbacks")
def test_the_notice_says_waiting_only_while_a_placement_group_is_pending(ray_cluster, capsys):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    notice = QueueNotice()
    notice.stage = "adapt"
    notice._notice({"CPU": 2.0}, 2, time.monotonic())
    assert capsys.readouterr().out.strip() == "[adapt] starting 2 Ray Train worker(s) (2 CPU reserved) …"
    assert notice._waiting_since is None  # so no "workers placed after waiting" line follows

    too_big = placement_group([{"CPU": ray.cluster_resources()["CPU"] + 1}])  # can never be placed
    try:
        deadline = time.monotonic() + 10
        while ray.util.placement_group_table(too_big)["state"] != "PENDING" and time.monotonic() < deadline:
            time.sleep(0.1)
        notice._notice({"CPU": 2.0}, 2, time.monotonic())
        out = capsys.readouterr().out
        assert out.startswith("[adapt] waiting for 2 CPU for 2 Ray Train worker(s) (free now: ") and "of 2 CPU" in out
        assert notice._waiting_since is not None
    finally:
        remove_placement_group(too_big)
