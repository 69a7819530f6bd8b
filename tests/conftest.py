import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true",
                     help="rewrite tests/golden/* and slurm/multi_node.slurm from the current renderer")


@pytest.fixture(scope="session")
def update_goldens(request):
    return request.config.getoption("--update-goldens")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny Llama + tokenizer built once per session, through the same command users run."""
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    subprocess.run([sys.executable, "-m", "hpcft.cli", "make-tiny-model", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    return out


# --- Running in parallel (envs/test.sh: pytest -n N) ---------------------------------------------------
# Integration modules mostly wait on Slurm while unit tests compute, so they run side by side. What starts
# first: the longest integration work, then the unit modules that start ranks, then the rest.
FIRST = ("tests/integration/test_strategies.py", "tests/integration/test_time_limits.py",
         "tests/integration/test_world_resume.py", "tests/integration/test_reliability.py",
         "tests/integration/test_slurm_paths.py", "tests/integration/test_site.py",
         "tests/integration/test_data_jobs.py", "tests/test_model_zoo.py", "tests/test_weight_loading.py",
         "tests/test_train_local.py",
         "tests/test_zero_reshard.py", "tests/test_zero_patches.py", "tests/test_trackers.py",
         "tests/test_packing.py")


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    rank = {m: i for i, m in enumerate(FIRST)}
    items.sort(key=lambda item: (item.get_closest_marker("cluster_restart") is not None,  # last: see integration
                                 rank.get(_module(item.nodeid), len(FIRST))))  # stable: file order otherwise


def _shares_module_fixtures(module: str) -> bool:
    """A module with a module-scoped fixture (jobs submitted once for several tests) stays on one worker;
    any other module's tests are spread one by one."""
    try:
        return 'scope="module"' in (ROOT / module).read_text()
    except OSError:
        return True


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByModuleFixtures(LoadScopeScheduling):
        """xdist's loadscope, with two changes: a module is one unit only when its tests share
        module-scoped fixtures, and a worker is given its next unit only when it is down to its last
        test (loadscope's "more than 2 pending" queued unit tests behind a 10-minute integration module)."""

        def __init__(self, config, log=None):
            super().__init__(config, log)
            self._whole = {}

        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            if module not in self._whole:
                self._whole[module] = _shares_module_fixtures(module)
            return module if self._whole[module] else nodeid

        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) > 1:
                return
            self._assign_work_unit(node)

    return ByModuleFixtures(config, log)


# --- Where the CPU goes (envs/test.sh sets HPCFT_TEST_CPU_LOG; tests/cpu_report.py reads it) ----------------
# The suite is CPU-bound on 2 cores, so wall time says little about which test to make cheaper: each test's
# line has the CPU-seconds the whole machine spent while it ran (its Slurm jobs and ranks included, and
# whatever ran beside it: exact where one test runs at a time, phase 1 and 2's parallel tests share it).
def machine_busy_s() -> float:
    """CPU-seconds the machine has been busy since boot, all cores together (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    log = os.environ.get("HPCFT_TEST_CPU_LOG")
    if not log:
        yield
        return
    busy, start = machine_busy_s(), time.monotonic()
    yield  # setup (module fixtures count in the first test that needs them), call, teardown
    record = {"test": item.nodeid, "wall_s": round(time.monotonic() - start, 2),
              "machine_cpu_s": round(machine_busy_s() - busy, 1)}
    with open(log, "a") as f:  # one short O_APPEND write per test: xdist workers do not interleave
        f.write(json.dumps(record) + "\n")
