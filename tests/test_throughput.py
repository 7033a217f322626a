"""The generation rate a plan's time estimate comes from: recorded per model, device, dtype and batch size."""

from __future__ import annotations

import pytest
import torch

from nsteer.throughput import RATES, Metered, duration, rate_key, read_rate, record_rate, record_run


def test_a_recorded_rate_is_read_back_and_averaged_with_the_next(tmp_path) -> None:
    key = rate_key("embedded:smollm2-135m-instruct", "cpu", "float32", 8)
    assert read_rate(key, tmp_path) is None
    record_rate(key, seconds=64.0, answers=16, max_new_tokens=64, root=tmp_path)  # 1/16 s per answer token
    rate = read_rate(key, tmp_path)
    assert rate is not None and rate.seconds_per_token == 1 / 16 and rate.answers == 16
    assert rate.seconds(answers=100, max_new_tokens=32) == pytest.approx(200.0)
    record_rate(key, seconds=96.0, answers=16, max_new_tokens=64, root=tmp_path)  # 3/32: averaged with 1/16
    rate = read_rate(key, tmp_path)
    assert rate.seconds_per_token == pytest.approx((1 / 16 + 3 / 32) / 2) and rate.answers == 32
    assert "on this machine over 32 earlier answers" in rate.estimate(10, 64)


def test_rates_are_kept_apart_by_what_they_depend_on(tmp_path) -> None:
    cpu = rate_key("m", "cpu", "float32", 8)
    record_rate(cpu, seconds=10.0, answers=10, max_new_tokens=10, root=tmp_path)
    for other in (
        rate_key("m", "cpu", "float32", 16),
        rate_key("m", "cpu", "bfloat16", 8),
        rate_key("other", "cpu", "float32", 8),
        rate_key("m", "ndif", "remote", 8),
    ):
        assert read_rate(other, tmp_path) is None, other
    assert rate_key("m", "cpu", "torch.float32", 8) == cpu  # a torch dtype's name is the recipe's
    assert rate_key("m", "cpu", "auto", 8) == cpu  # the default dtype is what opening the model picks here
    assert rate_key("m", "cuda:1", "bfloat16", 8).device == "cuda"
    assert cpu.threads == torch.get_num_threads()


def test_a_damaged_or_foreign_rate_file_means_no_estimate(tmp_path) -> None:
    key = rate_key("m", "cpu", "float32", 8)
    (tmp_path / RATES).write_bytes(b"\xff not json")
    assert read_rate(key, tmp_path) is None
    (tmp_path / RATES).write_text('{"' + key.text + '": {"seconds_per_token": -1.0, "answers": 3}}')
    assert read_rate(key, tmp_path) is None
    (tmp_path / RATES).write_text('{"' + key.text + '": {"seconds_per_token": "fast", "answers": 3}}')
    assert read_rate(key, tmp_path) is None
    record_rate(key, seconds=1.0, answers=1, max_new_tokens=1, root=tmp_path)  # a fresh record replaces it
    assert read_rate(key, tmp_path).seconds_per_token == 1.0
    for seconds, answers in ((0.0, 4), (float("nan"), 4), (2.0, 0)):  # nothing measured: nothing recorded
        record_rate(key, seconds=seconds, answers=answers, max_new_tokens=4, root=tmp_path)
    assert read_rate(key, tmp_path).seconds_per_token == 1.0


def test_a_run_records_its_rate_over_what_it_generated(tmp_path, monkeypatch) -> None:
    import time

    monkeypatch.setenv("NSTEER_CACHE_DIR", str(tmp_path))
    key = rate_key("m", "cpu", "float32", 4)
    calls = []

    def generator(handle, prompts, **kwargs):
        calls.append((handle, list(prompts), kwargs))
        return ["answer"] * len(prompts)

    meter = Metered(generator)
    started = time.monotonic() - 8.0  # a run that took 8 s
    record_run(key, meter, started, 16)
    assert read_rate(key) is None  # nothing generated (all from a checkpoint): nothing learned
    assert meter("h", ["a", "b"], config="c") == ["answer", "answer"]
    assert calls == [("h", ["a", "b"], {"config": "c"})] and meter.answers == 2
    record_run(key, meter, started, 16)
    rate = read_rate(key)
    assert rate.answers == 2 and rate.seconds_per_token == pytest.approx(8.0 / 32, rel=0.05)


def test_durations_read_as_people_say_them() -> None:
    assert [duration(s) for s in (0.2, 45, 89, 90, 725, 7199, 7260)] == [
        "1 s",
        "45 s",
        "89 s",
        "2 min",
        "12 min",
        "2 h 00 min",
        "2 h 01 min",
    ]
