"""The thread policy (omnimoe.threads): settings, what each policy sets, and the auto policy following a busy
core. Speeds are measured in benchmarks/contention.py, never here."""

import json
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from omnimoe.threads import ENV, ThreadPolicy, _CpuSampler, check_setting, setting, usable_cores, work_of


def test_settings_are_checked(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert setting() == "auto"
    for good in ("auto", "torch", "1", "3"):
        monkeypatch.setenv(ENV, good)
        assert setting() == good
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=f"{ENV}='{bad}'"):
            setting()
    with pytest.raises(ValueError, match="work 'medium'"):
        ThreadPolicy("medium", "auto")  # type: ignore[arg-type]


def test_each_policy_sets_its_threads_and_restores_the_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with ThreadPolicy("small", "auto") as policy:
            assert torch.get_num_threads() == 1 and policy.threads == 1
            policy.tick()
            assert torch.get_num_threads() == 1  # small work stays on one thread
        assert torch.get_num_threads() == 2
        with ThreadPolicy("large", "3"):
            assert torch.get_num_threads() == 3
        with ThreadPolicy("small", "torch"):
            assert torch.get_num_threads() == 2  # torch's own count, untouched
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_work_of_reads_the_model_size():
    assert work_of(torch.nn.Linear(10, 10)) == "small"
    big = torch.nn.Module()
    big.w = torch.nn.Parameter(torch.empty(0))
    big.w.data = torch.empty(51_000_000, dtype=torch.float16)
    assert work_of(big) == "large"


def test_auto_threads_are_the_free_cores():
    policy = ThreadPolicy("large", "auto")
    policy.cores = 4
    assert [policy.threads_for(x) for x in (0.0, 0.3, 1.0, 1.5, 2.9, 3.5, 8.0)] == [4, 3, 3, 2, 1, 1, 1]
    assert policy.threads_for(None) == 4  # load unknown: every usable core
    policy.cores = 2
    assert [policy.threads_for(x) for x in (0.0, 0.1, 0.5, 1.0)] == [2, 2, 1, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_auto_gives_a_core_back_when_another_process_holds_it():
    cores = usable_cores()
    if cores < 2:
        pytest.skip("one core: nothing to give back")
    before = torch.get_num_threads()
    loops = [subprocess.Popen([sys.executable, "-c", "while True:\n    pass"]) for _ in range(cores - 1)]
    try:
        time.sleep(0.5)
        sampler = _CpuSampler()
        time.sleep(0.5)
        others = sampler.others()
        assert others is not None and others >= 0.6 * (cores - 1), others  # the busy loops are seen
        with ThreadPolicy("large", "auto", interval=0.2) as policy:
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                torch.ones(64, 64) @ torch.ones(64, 64)
                policy.tick()
            assert policy.threads == 1  # one core free: one thread
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
        torch.set_num_threads(before)


def test_cli_threads_option_and_info(monkeypatch):
    from omnimoe.cli import app

    monkeypatch.setenv(ENV, "auto")  # restored after the test: the option writes the variable
    result = CliRunner().invoke(app, ["--threads", "none", "info"])
    assert result.exit_code == 2 and "--threads='none'" in result.output
    result = CliRunner().invoke(app, ["--threads", "1", "info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["thread_policy"] == "1" and info["usable_cores"] == usable_cores()
    assert check_setting("torch") == "torch"
