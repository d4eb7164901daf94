"""The console: rank 0's lines through the `bsdist` logger, warnings on stderr, and log.txt holding
what the console showed (and the lines the launcher prints itself)."""

import re

import pytest

from bsdist.output import LOG, RunOutput, console


@pytest.fixture(autouse=True)
def rank_zero_afterwards():
    yield
    console(0)


def test_only_rank_zero_prints_lines(capsys):
    console(1)
    LOG.info("from rank 1")
    LOG.warning("a warning on rank 1")
    console(0)
    LOG.info("from rank 0")
    out, err = capsys.readouterr()
    assert "rank 1" not in out + err
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] from rank 0\n", out)


def test_warnings_go_to_stderr_and_one_handler_serves_every_call(capsys):
    console(0)
    console(0)
    LOG.warning("3 of 4 runs failed")
    out, err = capsys.readouterr()
    assert out == "" and err.count("3 of 4 runs failed") == 1


def test_log_txt_holds_the_console_lines_and_those_the_launcher_prints(tmp_path, capsys):
    out = RunOutput(str(tmp_path / "run"))
    console(0)
    out.start(_tiny_config(tmp_path), None, 0, 0)
    out.info("epoch 1: test acc 0.5")
    out.info("stopped: SIGTERM", console=False)
    out.close()
    LOG.info("after the run")  # the run's file handler is gone
    printed = capsys.readouterr().out
    logged = (tmp_path / "run" / "log.txt").read_text()
    assert "epoch 1: test acc 0.5" in printed and "stopped: SIGTERM" not in printed
    assert "epoch 1: test acc 0.5" in logged and "stopped: SIGTERM" in logged and "after the run" not in logged


def _tiny_config(tmp_path):
    from bsdist import config
    return config.validate(config.load(None, ["DEFAULT.savedir", str(tmp_path), "TRAIN.device", "cpu"]))
