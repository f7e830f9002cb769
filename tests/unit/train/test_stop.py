"""The signal handler: a first SIGTERM or SIGINT only asks for a stop, the launcher's forwarded copy is the
same request, a later one exits at once, and before the loop there is nothing to wait for."""
from __future__ import annotations

import os
import signal

import pytest

from defect_ds.train import stop as stop_module
from defect_ds.train.stop import StopRequest


class Exited(Exception):
    pass


@pytest.fixture
def request_(monkeypatch):
    """A StopRequest of rank 0 whose os._exit raises instead; the test's own handlers come back after."""
    before = {s: signal.getsignal(s) for s in stop_module.SIGNALS}

    def exit_(code):
        raise Exited(code)

    monkeypatch.setattr(stop_module.os, "_exit", exit_)
    yield StopRequest(rank=0)
    for s, handler in before.items():
        signal.signal(s, handler)


def test_a_signal_before_the_loop_exits_at_once_saying_nothing_was_saved(request_, capsys):
    with pytest.raises(Exited) as code:
        os.kill(os.getpid(), signal.SIGTERM)
    assert code.value.args == (143,)
    assert capsys.readouterr().err == "train.py: stopped on SIGTERM before training started; nothing was saved.\n"


def test_in_the_loop_a_signal_is_a_request_and_a_later_second_one_exits(request_, monkeypatch, capsys):
    request_.armed = True
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, no exit
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher's forwarded copy, moments later: the same request
    assert (request_.signum, request_.cause, request_.exit_code) == (signal.SIGINT, "SIGINT", 130)
    monkeypatch.setattr(stop_module, "REPEAT_WINDOW_S", -1.0)  # the person presses Ctrl-C again, later
    with pytest.raises(Exited) as code:
        os.kill(os.getpid(), signal.SIGINT)
    assert code.value.args == (130,)
    assert "stopped at once on a second SIGINT; the last committed checkpoint is intact" in capsys.readouterr().err


def test_the_runner_ending_on_the_first_signal_is_no_second_one(request_, monkeypatch):
    """A Ctrl-C ends DeepSpeed's runner as well; its watcher may see that later than REPEAT_WINDOW_S on a busy
    machine, and must not turn the stop into an exit without the save."""
    request_.armed = True
    os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(stop_module, "REPEAT_WINDOW_S", -1.0)
    request_.request(signal.SIGTERM, "the exit of the deepspeed runner (pid 1)", repeat_exits=False)
    assert (request_.signum, request_.cause) == (signal.SIGINT, "SIGINT")
    with pytest.raises(Exited):  # a second Ctrl-C still exits at once
        os.kill(os.getpid(), signal.SIGINT)


def test_once_the_stop_is_saved_further_signals_change_nothing(request_, monkeypatch):
    request_.armed = True
    os.kill(os.getpid(), signal.SIGTERM)
    stopped = request_.stopped(7, "step-0000007")
    assert str(stopped) == ("stopped on SIGTERM after step 7; checkpoint step-0000007 is committed; resume with "
                            "--resume latest.")
    assert stopped.exit_code == 143
    monkeypatch.setattr(stop_module, "REPEAT_WINDOW_S", -1.0)
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher stopping a rank that is already on its way out


def test_a_rank_that_was_not_signalled_names_the_signal_of_another(request_):
    request_.agreed_signum = signal.SIGTERM
    assert request_.lost_peer_message() == "rank 0 stopped: another rank got SIGTERM."
    assert str(request_.stopped(3, "step-0000003")).startswith("stopped on SIGTERM sent to another rank after step 3;")
    fresh = StopRequest(rank=1)
    assert fresh.lost_peer_message() is None  # no signal anywhere: another rank failed


def test_a_rank_whose_partner_saw_the_runner_end_names_the_runner_not_a_signal(request_):
    """Every rank watches the same runner; whichever sees its exit first, all of them name it."""
    request_.runner_pid = 4242
    request_.agreed_signum, request_.agreed_runner_gone = signal.SIGTERM, True
    assert str(request_.stopped(5, "step-0000005")).startswith(
        "stopped on the exit of the deepspeed runner (pid 4242) after step 5;")
    assert request_.lost_peer_message() == "rank 0 stopped on the exit of the deepspeed runner (pid 4242)."


def test_the_runners_exit_seen_here_travels_with_the_request(request_):
    request_.armed, request_.runner_pid = True, 7
    request_.request(signal.SIGTERM, request_._runner_exit(), repeat_exits=False, runner_gone=True)
    assert (request_.runner_gone, request_.cause) == (True, "the exit of the deepspeed runner (pid 7)")
