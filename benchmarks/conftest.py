"""pytest-benchmark settings shared by the benchmarks (the work is done in harness.py):
the machine and commit, and each group's speed-ups over its baseline, go into
--benchmark-json; the clock waits for CUDA at both ends of a timed round."""
import pytest

import harness


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("benchmark_timer", None) == "time.perf_counter":  # not chosen on the command line
        config.option.benchmark_timer = "harness.synced_clock"


def pytest_benchmark_update_machine_info(config, machine_info):
    harness.add_machine(machine_info)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    harness.add_speedups(output_json)
