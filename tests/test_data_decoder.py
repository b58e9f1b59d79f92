"""The decoder default: `auto` takes torchcodec where it loads and PyAV otherwise, says which in one log line,
and both backends stay selectable by name (in the loader API and as `data.decoder` in the run config)."""

from __future__ import annotations

import inspect
import logging

import pytest

from actionrec.config import ConfigError, build_config
from actionrec.data import build_eval_loader, build_train_loader, decode


@pytest.fixture
def decode_log():
    """Records of the decode module's logger (the run logger does not propagate to pytest's root handler)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.INFO)
    previous = decode.logger.level
    decode.logger.addHandler(handler)
    decode.logger.setLevel(logging.INFO)
    decode._log_choice.cache_clear()
    yield records
    decode._log_choice.cache_clear()
    decode.logger.removeHandler(handler)
    decode.logger.setLevel(previous)


def test_auto_is_the_default_of_the_loaders_and_the_run_config():
    for builder in (build_train_loader, build_eval_loader):
        assert inspect.signature(builder).parameters["decoder"].default == "auto"
    assert build_config({}, check_paths=False).data.decoder == "auto"


def test_auto_prefers_torchcodec_and_says_so_once(monkeypatch, decode_log):
    monkeypatch.setattr(decode, "torchcodec_load_error", lambda: None)
    assert [decode.resolve_decoder("auto") for _ in range(3)] == ["torchcodec"] * 3
    assert len(decode_log) == 1  # loaders are rebuilt for every evaluation: one line per process is enough
    assert "torchcodec" in decode_log[0].getMessage() and "auto" in decode_log[0].getMessage()


def test_auto_falls_back_to_pyav_with_the_reason(monkeypatch, decode_log):
    monkeypatch.setattr(decode, "torchcodec_load_error", lambda: "OSError: libavutil.so.59: cannot open shared object")
    assert decode.resolve_decoder("auto") == "pyav"
    message = decode_log[0].getMessage()
    assert "PyAV" in message and "libavutil.so.59" in message


def test_each_backend_stays_selectable_by_name(monkeypatch, decode_log):
    monkeypatch.setattr(decode, "torchcodec_load_error", lambda: None)
    assert decode.resolve_decoder("pyav") == "pyav"
    assert decode.resolve_decoder("torchcodec") == "torchcodec"
    monkeypatch.setattr(decode, "torchcodec_load_error", lambda: "OSError: no libavcodec")
    with pytest.raises(RuntimeError, match="decoder='pyav'"):
        decode.resolve_decoder("torchcodec")
    with pytest.raises(ValueError, match="'auto', 'pyav' or 'torchcodec'"):
        decode.resolve_decoder("ffmpeg")


def test_run_config_takes_the_decoder_by_name():
    assert build_config({}, ["data.decoder=pyav"], check_paths=False).data.decoder == "pyav"
    with pytest.raises(ConfigError, match="data.decoder"):
        build_config({}, ["data.decoder=ffmpeg"], check_paths=False)


def test_trainer_hands_the_configured_decoder_to_both_loaders(monkeypatch):
    from actionrec.engine import trainer

    seen = {}
    monkeypatch.setattr("actionrec.data.build_train_loader", lambda *a, **kw: [seen.setdefault("train", kw)])
    monkeypatch.setattr("actionrec.data.build_eval_loader", lambda *a, **kw: seen.setdefault("eval", kw))
    cfg = build_config({}, ["data.decoder=pyav"], check_paths=False)
    data = trainer.DataSetup(shardset=None, classes=["a"], clip=None, train_samples=8, batches_per_epoch=1)
    next(trainer.train_batches(cfg, data, 0, rank=0, world_size=1))
    trainer.eval_batches(cfg, data, "val", rank=0, world_size=1)
    assert seen["train"]["decoder"] == "pyav" and seen["eval"]["decoder"] == "pyav"
