"""Settings: one definition drives flags, env vars, --help and validation."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from batchserve.cli import build_parser, main
from batchserve.settings import Settings, SettingsError, env_name, flag_name


def test_defaults_match_the_design_card() -> None:
    s = Settings()
    assert (s.model, s.host, s.port) == ("tiny", "127.0.0.1", 8000)
    assert (s.max_batch_size, s.max_wait_ms, s.max_queue) == (8, 500.0, 256)
    assert (s.device, s.dtype, s.scheduler) == ("auto", "auto", "dpm++2m-karras")
    assert (s.max_pixels, s.max_steps, s.max_body_bytes) == (1048576, 150, 65536)


def test_env_then_flags_override_defaults() -> None:
    env = {"BATCHSERVE_MAX_WAIT_MS": "250", "BATCHSERVE_PORT": "9000",
           "BATCHSERVE_CHANNELS_LAST": "false", "BATCHSERVE_API_KEY": "secret-key-1"}
    s = Settings.from_sources({"port": 9100}, env=env)
    assert (s.max_wait_ms, s.port, s.channels_last, s.api_key) == (250.0, 9100, False,
                                                                   "secret-key-1")
    assert s.public()["api_key"] == "set"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max_batch_size": 0}, "--max-batch-size=0: must be 1..256"),
    ({"max_wait_ms": -1}, "--max-wait-ms=-1: must be 0..60000"),
    ({"device": "tpu"}, "--device='tpu': must be one of auto, cuda, cpu"),
    ({"warmup": "512x"}, "--warmup"),
    ({"warmup": "500x512"}, "multiples of 8"),
    ({"api_key": "short"}, "--api-key"),
    ({"max_priority": 11}, "--max-priority=11: must be -10..10"),
    ({"max_cost": -1}, "--max-cost=-1: must be >= 0"),
    ({"watchdog_factor": 1.0}, "--watchdog-factor=1.0: must be 0 (off) or >= 1.5"),
    ({"warmup_batch_sizes": "1,9"}, "--warmup-batch-sizes='1,9': must be auto or"),
    ({"warmup_batch_sizes": "two"}, "--warmup-batch-sizes"),
    ({"role": "gpu"}, "--role='gpu': must be one of all, api, worker"),
    ({"queue": "rabbitmq://h/"}, "--queue='rabbitmq://h/': must be `memory` or redis://"),
    ({"queue": "redis:/h"}, "--queue"),
    ({"results": "gcs://bucket"}, "--results='gcs://bucket': must be `memory`, file://DIR or s3://"),
    ({"results": "s3://"}, "--results='s3://'"),
    ({"results": "file://"}, "--results='file://'"),
    ({"job_ttl_s": 0}, "--job-ttl-s=0: must be > 0"),
    ({"job_max_attempts": 0}, "--job-max-attempts=0: must be 1..100"),
    ({"role": "api", "queue": "memory"}, "--queue=memory with --role=api"),
])
def test_invalid_settings_name_the_setting_and_rule(overrides: dict[str, object],
                                                    message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_sources(overrides, env={})


def test_job_backend_settings() -> None:
    s = Settings.from_sources(env={"BATCHSERVE_ROLE": "worker",
                                   "BATCHSERVE_QUEUE": "redis://:pw@redis:6379/0",
                                   "BATCHSERVE_RESULTS": "s3://images/jobs",
                                   "BATCHSERVE_RESULT_REDIRECT": "true"})
    assert (s.role, s.results, s.result_redirect) == ("worker", "s3://images/jobs", True)
    assert s.public()["queue"] == "redis://***@redis:6379/0"
    assert (s.job_ttl_s, s.job_visibility_timeout_s, s.job_max_attempts) == (86400, 120, 3)
    with pytest.raises(SettingsError) as refused:
        Settings(queue="amqp://user:pw@h/")
    assert "pw" not in str(refused.value)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="BATCHSERVE_MAX_QUEUE='lots'"):
        Settings.from_sources(env={"BATCHSERVE_MAX_QUEUE": "lots"})


def test_every_setting_has_a_flag_with_env_and_default_in_help() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    for f in dataclasses.fields(Settings):
        assert flag_name(f.name) in text
        assert env_name(f.name) in text
    for flag in ("--model", "--host", "--port", "--device", "--dtype", "--max-batch-size",
                 "--max-wait-ms", "--max-queue", "--scheduler"):
        assert flag in text


def test_cli_rejects_invalid_setting_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size=0" in capsys.readouterr().err


def test_python_dash_m_help_works() -> None:
    out = subprocess.run([sys.executable, "-m", "batchserve", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "BATCHSERVE_MAX_WAIT_MS" in out and "(default: 500.0)" in out


def test_adaptive_batch_is_on_or_off() -> None:
    assert Settings().adaptive_batch == "on"
    assert Settings.from_sources(env={"BATCHSERVE_ADAPTIVE_BATCH": "off"}).adaptive_batch == "off"
    with pytest.raises(SettingsError, match="--adaptive-batch='maybe': must be one of on, off"):
        Settings(adaptive_batch="maybe")


@pytest.mark.parametrize(("overrides", "device", "sizes"), [
    ({}, "cuda", [1, 8]),
    ({}, "cpu", [1]),  # CPU start stays quick (tests start many tiny servers)
    ({"compile": True, "max_batch_size": 4}, "cpu", [1, 4]),
    ({"warmup_batch_sizes": "4, 1,4"}, "cpu", [1, 4]),
    ({"max_batch_size": 1}, "cuda", [1]),
])
def test_warmup_batch_sizes(overrides: dict[str, object], device: str, sizes: list[int]) -> None:
    assert Settings(**overrides).warmup_batch_sizes_on(device) == sizes  # type: ignore[arg-type]
