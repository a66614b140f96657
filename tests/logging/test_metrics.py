"""The metrics logger: tensorboard event files read back with tensorboard's own reader, and the
console progress line's ETA (clocked from the first logged step, not from start-up)."""

from __future__ import annotations

from rlsd_megatron.config import LoggingConfig
from rlsd_megatron.logging import metrics as metrics_module
from rlsd_megatron.logging.metrics import MetricsLogger


def test_scalars_reach_tensorboard_and_eta_ignores_start_up(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    now = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: now[0])
    logger = MetricsLogger(LoggingConfig(dir=str(tmp_path), log_interval=1), total_steps=20, enabled=True)
    now[0] += 3600.0  # an hour of start-up and warm start before the first (resumed) step
    logger.log(10, {"reward/mean": 0.25})
    now[0] += 20.0  # then 2 s per step
    logger.log(20, {"reward/mean": 0.5, "val/reward": 0.75})
    logger.close()
    first, second = capsys.readouterr().err.splitlines()
    assert first == "[step 10/20  50% ETA ?] reward/mean=0.25"
    assert second == "[step 20/20 100% ETA 0:00:00] reward/mean=0.5 val/reward=0.75"

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(10, 0.25), (20, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("val/reward")] == [(20, 0.75)]


def test_eta_from_the_measured_rate(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: now[0])
    logger = MetricsLogger(LoggingConfig(dir=str(tmp_path), tensorboard=False), total_steps=300, enabled=True)
    logger.log(1, {})
    now[0] += 9.0
    assert logger._progress_line(10, {}).startswith("[step 10/300   3% ETA 0:04:50]")  # 1 s/step x 290


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    logger = MetricsLogger(LoggingConfig(dir=str(tmp_path / "tb")), total_steps=5, enabled=False)
    logger.log(5, {"reward/mean": 1.0})
    logger.message("hello")
    logger.close()
    assert not (tmp_path / "tb").exists() and capsys.readouterr().err == ""


def test_config_written_next_to_the_events(tmp_path):
    import yaml

    from rlsd_megatron.config import Config, config_to_dict

    logger = MetricsLogger(LoggingConfig(dir=str(tmp_path)), total_steps=1, enabled=True)
    logger.write_config(config_to_dict(Config()))
    logger.close()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config_to_dict(Config())


def test_earlier_event_files_are_noticed(tmp_path):
    first = MetricsLogger(LoggingConfig(dir=str(tmp_path)), total_steps=1, enabled=True)
    first.log(1, {"reward/mean": 0.0})
    first.close()
    assert first.earlier_event_files == []
    second = MetricsLogger(LoggingConfig(dir=str(tmp_path)), total_steps=1, enabled=True)
    second.close()
    assert len(second.earlier_event_files) == 1
