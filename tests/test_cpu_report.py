"""The suite's own CPU accounting (tests/conftest.py writes a line per test, tests/cpu_report.py sums)."""
import json

from tests.conftest import machine_busy_s
from tests.cpu_report import main


def test_the_report_sums_the_lines_and_names_the_costliest_tests_first(tmp_path, capsys):
    log = tmp_path / "cpu.jsonl"
    rows = [{"test": "a", "wall_s": 1.0, "machine_cpu_s": 3.0}, {"test": "b", "wall_s": 9.0, "machine_cpu_s": 17.5},
            {"test": "c", "wall_s": 2.0, "machine_cpu_s": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(log), "--top", "2", "--since", str(machine_busy_s())]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("machine CPU over the whole run: ")
    assert out[1].startswith("3 tests; CPU-s seen while each ran, summed: 21 ")
    assert [line.split()[-1] for line in out[2:]] == ["b", "a"]


def test_the_machine_busy_count_grows_with_work():
    before = machine_busy_s()
    x = 0
    for i in range(3_000_000):
        x += i
    assert machine_busy_s() > before
