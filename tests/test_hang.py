"""Hang triage and step statistics without a cluster: the culprit rules, the stack read back from a
watchdog dump, the stopped-rank check of the wrapper, straggler arithmetic, config validation."""
import json
import signal
import subprocess
import time

import pytest

from hpcft.errors import SpecError
from hpcft.hang import find_culprit, main_stack
from hpcft.heartbeat import HANG_EXIT, Heartbeat, read_heartbeats, write_heartbeat
from hpcft.logs import first_failure
from hpcft.paths import RunPaths
from hpcft.rankrun import is_stopped, watch_stopped
from hpcft.rankstats import percentile, rank_summary, step_stats, straggler_line, stragglers
from hpcft.train.config import TrainConfig
from hpcft.train.watchdog import Progress

pytestmark = pytest.mark.quiet  # watchers and timers with second bounds: run with the machine to itself

MAIN = "0x00007f0000000001"
DUMP = [f"hpcft.watchdog: rank 1: no progress for 20 s (hang_timeout_s 20) after step 5, in phase forward; the stack "
        f"of every thread follows (main thread {MAIN})",
        "Current thread 0x00007f0000000002 (most recent call first):",
        '  File "hpcft/train/watchdog.py", line 200 in _fire',
        "",
        f"Thread {MAIN} (most recent call first):",
        '  File "hpcft/train/watchdog.py", line 150 in inject',
        '  File "hpcft/train/loop.py", line 114 in train',
        "hpcft.watchdog: end of stacks"]


def beat(rank, *, step=5, phase="backward", beats=40, progress=100.0, written=130.0, hung=130.0):
    return Heartbeat(rank=rank, host=f"node{rank // 2 + 1}", pid=1000 + rank, step=step, phase=phase, beats=beats,
                     progress=progress, written=written, interval_s=2.0, hang_timeout_s=20, armed=True, hung=hung)


def make_run(tmp_path, beats, exits, logs=None):
    paths = RunPaths(tmp_path / "it" / "9")
    paths.run_dir.mkdir(parents=True)
    for b in beats:
        write_heartbeat(paths.rank_heartbeat(b.rank), b)
    for rank, (rc, ended, stopped) in exits.items():
        paths.rank_exit(rank).write_text(json.dumps(
            {"rank": rank, "host": f"node{rank // 2 + 1}", "returncode": rc, "ended": ended, "stopped": stopped,
             "signal": {-9: "SIGKILL", -15: "SIGTERM"}.get(rc)}))
    for rank in range(len(beats)):
        paths.rank_log(rank).write_text("\n".join((logs or {}).get(rank, ["step 1"])) + "\n")
    return paths


def test_rank_behind_is_named_with_the_top_of_its_stack_not_rank_0(tmp_path):
    beats = [beat(0), beat(1, phase="forward", beats=39, progress=99.9), beat(2), beat(3)]
    paths = make_run(tmp_path, beats, {r: (HANG_EXIT, 131.0 - r / 10, False) for r in range(4)},
                     logs={1: ["step 5", *DUMP]})
    f = first_failure(paths)
    assert (f.rank, f.host) == (1, "node1")
    assert f.reason == "hung: no progress; last completed step 5, phase forward"
    assert any("in inject" in line for line in f.tail) and not any("_fire" in line for line in f.tail)


def test_stopped_rank_is_named_though_its_heartbeat_is_older(tmp_path):
    beats = [beat(0), beat(1), beat(2), beat(3, step=3, phase="data", beats=30, progress=98.0, written=99.0,
                                                hung=None)]
    exits = {0: (HANG_EXIT, 131.0, False), 1: (HANG_EXIT, 131.0, False), 2: (HANG_EXIT, 131.0, False),
             3: (-9, 131.5, True)}
    f = first_failure(make_run(tmp_path, beats, exits))
    assert f.rank == 3 and f.reason.startswith("hung: stopped (SIGSTOP, state T); last completed step 5")
    assert any("no stack" in line for line in f.tail)


def test_frozen_heartbeat_beats_ranks_behind_it():
    beats = {0: beat(0), 1: beat(1, beats=10, progress=50.0), 2: beat(2, written=101.0, hung=None)}
    assert find_culprit(beats, stopped=set(), hang_exits={0}).beat.rank == 2


def test_no_hang_without_a_watchdog_exit_or_a_stopped_rank():
    assert find_culprit({0: beat(0, hung=None), 1: beat(1, hung=None)}, stopped=set(), hang_exits=set()) is None


def test_a_crash_before_the_hang_is_the_first_failure(tmp_path):
    beats = [beat(0), beat(1, beats=39)]
    f = first_failure(make_run(tmp_path, beats, {0: (HANG_EXIT, 131.0, False), 1: (1, 90.0, False)}))
    assert (f.rank, f.reason) == (1, "exit code 1")


def test_main_stack_picks_the_main_thread():
    assert main_stack(DUMP)[0] == f"Thread {MAIN} (most recent call first):"
    assert "inject" in main_stack(DUMP)[1]


def test_heartbeat_roundtrip(tmp_path):
    paths = RunPaths(tmp_path)
    write_heartbeat(paths.rank_heartbeat(7), beat(7))
    assert read_heartbeats(paths) == {7: beat(7)}


def test_wrapper_sees_a_stopped_process():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert not is_stopped(proc.pid)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        assert is_stopped(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_a_stop_is_remembered_even_when_slurm_continues_the_rank_before_killing_it():
    """Slurm's step teardown sends SIGCONT then SIGTERM: the rank dies running, yet it was stopped."""
    proc = subprocess.Popen(["sleep", "30"])
    seen: list = []
    try:
        watcher = watch_stopped(proc, seen, interval=0.1)
        time.sleep(0.3)
        assert seen == []  # running: nothing seen
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.5)
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait()
        watcher.join(timeout=2)
        assert seen == [True]
    finally:
        proc.kill()


def test_straggler_is_the_rank_above_1_2x_the_world_median():
    assert stragglers({0: 0.10, 1: 0.11, 2: 0.30, 3: 0.10}) == [2]
    assert stragglers({0: 0.10, 1: 0.11, 2: 0.115, 3: 0.10}) == []
    assert "rank 2 (0.300 s, 2.9x)" in straggler_line({0: 0.10, 1: 0.11, 2: 0.30, 3: 0.10}, 10, 9)
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
    rows = [{"rank": r, "host": f"node{r // 2 + 1}", **step_stats([0.1 + 0.3 * (r == 2)] * 5, [0.5] * 5, 1.0)}
            for r in range(4)]
    summary = rank_summary(rows)
    assert summary["stragglers"] == [2] and summary["data_wait_s_per_node"] == {"node1": 2.0, "node2": 2.0}


def test_progress_times_busy_phases_and_steps():
    p = Progress()
    for step in range(1, 4):
        for _ in p.data([1]):
            p.phase("forward")
            time.sleep(0.01)
            p.phase("backward")
            time.sleep(0.05)
        p.phase("optimizer")
        p.step_done(step)
    s = p.stats()
    assert s["steps"] == 2 and 0.01 <= s["busy_median_s"] < s["step_median_s"] and s["step_median_s"] >= 0.06
    assert p.armed is True and p.step == 3
    p.phase("checkpoint")
    assert p.armed is False


@pytest.mark.parametrize("value", [-1, 600, 601])
def test_hang_timeout_must_be_below_the_collective_timeout(value):
    with pytest.raises(SpecError, match="train.hang_timeout_s"):
        TrainConfig(hang_timeout_s=value).validate()
    TrainConfig(hang_timeout_s=0).validate()


def test_stack_dumped_on_sigterm_is_read_when_no_watchdog_fired(tmp_path):
    beats = [beat(0), beat(1, phase="forward", beats=39, hung=None)]
    paths = make_run(tmp_path, beats, {0: (HANG_EXIT, 131.0, False), 1: (-15, 131.2, False)},
                     logs={1: ["step 5", *DUMP[4:7]]})
    f = first_failure(paths)
    assert f.rank == 1 and any("in inject" in line for line in f.tail)
