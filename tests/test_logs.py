import json
import time

from hpcft.logs import first_failure, rank_by_rank_lines
from hpcft.paths import RunPaths, find_run_dir
from hpcft.rankrun import write_exit_record

TB = ["Traceback (most recent call last):", '  File "train.py", line 3, in <module>',
      "RuntimeError: CUDA error: out of memory"]


def make_run(tmp_path, logs, exits):
    paths = RunPaths(tmp_path / "job" / "77")
    paths.run_dir.mkdir(parents=True)
    for rank, lines in logs.items():
        paths.rank_log(rank).write_text("\n".join(lines) + "\n")
    for rank, (rc, ended) in exits.items():
        paths.rank_exit(rank).write_text(json.dumps(
            {"rank": rank, "host": f"node{rank // 2 + 1}", "returncode": rc,
             "signal": {-15: "SIGTERM", -9: "SIGKILL"}.get(rc), "ended": ended}))
    return paths


def test_first_failed_rank_is_named_with_its_traceback(tmp_path):
    paths = make_run(tmp_path, {0: ["ok"], 1: ["ok"], 2: ["step 1", *TB], 3: ["ok"]},
                     {0: (-15, 20.0), 1: (-15, 20.0), 2: (1, 10.0), 3: (-15, 21.0)})
    f = first_failure(paths)
    assert (f.rank, f.host, f.reason) == (2, "node2", "exit code 1")
    assert f.tail[0].startswith("Traceback") and "out of memory" in f.tail[-1]


def test_killed_rank_beats_ranks_terminated_after_it(tmp_path):
    paths = make_run(tmp_path, {r: ["x"] for r in range(4)},
                     {0: (-15, 5.0), 1: (-9, 6.0), 2: (-15, 5.5), 3: (0, 7.0)})
    f = first_failure(paths)
    assert (f.rank, f.reason) == (1, "signal SIGKILL")


def test_no_failure(tmp_path):
    paths = make_run(tmp_path, {0: ["fine"], 1: ["fine"]}, {0: (0, 1.0), 1: (0, 1.0)})
    assert first_failure(paths) is None


def test_traceback_without_exit_record(tmp_path):
    paths = make_run(tmp_path, {0: ["fine"], 1: TB}, {0: (0, 1.0)})
    assert first_failure(paths).rank == 1


def test_merged_lines_have_rank_prefixes_in_rank_order(tmp_path):
    paths = make_run(tmp_path, {1: ["b"], 0: ["a"], 10: ["c"]}, {})
    assert list(rank_by_rank_lines(paths)) == ["[rank 000] a", "[rank 001] b", "[rank 010] c"]


def test_find_run_dir_by_job_id(tmp_path):
    paths = make_run(tmp_path, {0: ["a"]}, {})
    assert find_run_dir("77", tmp_path) == paths.run_dir
    assert find_run_dir(str(paths.run_dir)) == paths.run_dir
    assert find_run_dir("78", tmp_path) is None


def test_exit_record_from_signal(tmp_path):
    p = tmp_path / "rank-000.exit.json"
    write_exit_record(p, rank=0, returncode=-9, started=time.time())
    d = json.loads(p.read_text())
    assert d["signal"] == "SIGKILL" and d["returncode"] == -9 and d["host"]


def test_traceback_across_a_block_boundary_is_found(tmp_path, monkeypatch):
    import hpcft.logs as logs

    monkeypatch.setattr(logs, "BLOCK", 64)  # the header will straddle two reads
    log = tmp_path / "rank-000.log"
    log.write_text("x" * 50 + "\n" + "\n".join(TB) + "\nafter\n")
    found, tail = logs.traceback_tail(log)
    assert found and tail[0] == TB[0] and tail[-1] == "after"
    assert logs.last_traceback_offset(log) == 51


def test_without_traceback_the_last_lines_are_the_tail(tmp_path):
    from hpcft.logs import traceback_tail

    log = tmp_path / "rank-000.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    found, tail = traceback_tail(log, max_lines=3)
    assert not found and tail == ["line 99997", "line 99998", "line 99999"]


def test_without_exit_records_the_rank_whose_log_stopped_first_failed_first(tmp_path):
    import os

    paths = make_run(tmp_path, {0: ["ok", *TB], 1: ["ok"], 2: ["ok", *TB], 3: ["ok"]}, {})
    os.utime(paths.rank_log(0), (2000.0, 2000.0))  # rank 0 failed later, of the lost peer
    os.utime(paths.rank_log(2), (1000.0, 1000.0))
    f = first_failure(paths)
    assert (f.rank, f.reason) == (2, "traceback in log") and f.tail[0] == TB[0]
