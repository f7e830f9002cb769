"""A stop on a signal: SIGTERM or SIGINT makes the run finish its step, save it and exit; a second one exits at once.

    kill -TERM <pid of a rank, the launcher or the deepspeed runner>   # saves the current step, exits 143

Schedulers send SIGTERM (Slurm, Kubernetes, spot reclaims) and Ctrl-C sends SIGINT to every process of
the launch. The handler only records the request; after every optimizer step the loop asks `agreed()`,
an all_reduce of the flag, so every rank stops after the same step even when one rank alone was
signalled. DeepSpeed's launcher passes a signal it gets on to the ranks as SIGTERM a moment later: a
repeat within REPEAT_WINDOW_S is the same request. Before the loop starts there is nothing to save and
a signal ends the process at once.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

REPEAT_WINDOW_S = 2.0  # the launcher's forwarded copy arrives within milliseconds; a person's second Ctrl-C later
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped on a signal after saving; the message is the one line for the user."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """Turns SIGTERM and SIGINT into "a stop is requested"; install it in the main thread."""

    def __init__(self, rank: int):
        self.rank = rank
        self.pid = os.getpid()
        self.signum = 0  # the signal this rank got; 0: none
        self.cause = ""  # what to call it in messages: SIGTERM, or the runner's exit
        self.first_at = 0.0
        self.agreed_signum = 0  # the largest signal any rank got, as of the last `agreed()`
        self.runner_pid = 0  # the deepspeed runner above this rank's launcher; 0: none
        self.runner_gone = False  # this rank's stop came from the runner's exit, not from a signal
        self.agreed_runner_gone = False  # some rank's did, as of the last `agreed()`
        self.armed = False  # the loop runs: a request waits for the step boundary
        self.saved = False  # the stop's checkpoint is committed: later signals change nothing
        self.group = None
        for signum in SIGNALS:
            signal.signal(signum, self._on_signal)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or self.agreed_signum)

    def _on_signal(self, signum: int, frame) -> None:
        if os.getpid() == self.pid:  # a forked data loader worker inherits the handler: its rank decides
            self.request(signum, signal.Signals(signum).name)

    def request(self, signum: int, cause: str, repeat_exits: bool = True, runner_gone: bool = False) -> None:
        """Records a stop; a repeat later than REPEAT_WINDOW_S exits at once unless repeat_exits is False
        (an event that follows from the first signal, such as the runner ending on it, is no second one).
        runner_gone: the stop is the runner's exit, which the other ranks then name as such."""
        now = time.monotonic()
        if not self.signum:
            self.signum, self.cause, self.first_at, self.runner_gone = signum, cause, now, runner_gone
            if not self.armed:
                self._exit_now(f"stopped on {cause} before training started; nothing was saved.")
        elif repeat_exits and not self.saved and now - self.first_at > REPEAT_WINDOW_S:
            self._exit_now(f"stopped at once on a second {signal.Signals(signum).name}; the last committed "
                           "checkpoint is intact; resume with --resume latest.")

    def _exit_now(self, message: str) -> None:
        if self.rank == 0:
            print(f"train.py: {message}", file=sys.stderr, flush=True)
        os._exit(self.exit_code)

    def arm(self) -> None:
        """The loop starts: from now on a request waits for the step boundary. Call it on every rank."""
        # a CPU flag over gloo: on GPUs the check adds no device sync to the step
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.armed = True

    def agreed(self) -> bool:
        """Whether any rank was signalled; every rank gets the same answer. Call it at each step boundary."""
        flag = torch.tensor([self.signum, int(self.runner_gone)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.agreed_signum, self.agreed_runner_gone = int(flag[0]), bool(flag[1])  # a CPU tensor: no device wait
        return bool(self.agreed_signum)

    def _peer_cause(self) -> str:
        """What stopped the run, for a rank that was not signalled itself: each rank watches the same runner."""
        if self.agreed_runner_gone and self.runner_pid:
            return self._runner_exit()
        return f"{signal.Signals(self.agreed_signum).name} sent to another rank"

    def _runner_exit(self) -> str:
        return f"the exit of the deepspeed runner (pid {self.runner_pid})"

    def stopped(self, step: int, tag: str) -> Stopped:
        """The one line after the stop's checkpoint `tag` of `step` is committed."""
        self.saved = True
        cause = self.cause or self._peer_cause()
        return Stopped(f"stopped on {cause} after step {step}; checkpoint {tag} is committed; resume with "
                       "--resume latest.", self.exit_code)

    def lost_peer_message(self) -> str | None:
        """What this rank says when a collective fails after a signal (a peer that exited at once), else None."""
        if self.signum:
            return f"rank {self.rank} stopped on {self.cause}."
        if self.agreed_signum:
            if self.agreed_runner_gone and self.runner_pid:
                return f"rank {self.rank} stopped on {self._runner_exit()}."
            return f"rank {self.rank} stopped: another rank got {signal.Signals(self.agreed_signum).name}."
        return None

    def watch_launcher(self, poll_s: float = 1.0) -> None:
        """Under the deepspeed launcher, a stop when the `deepspeed` runner above it exits: signalled alone
        (Kubernetes signals only the container's first process), the runner ends at once and leaves the
        launcher and the ranks running."""
        import psutil

        try:
            launcher = psutil.Process(os.getppid())
            if "deepspeed.launcher.launch" not in " ".join(launcher.cmdline()):
                return
            runner = launcher.ppid()
        except psutil.Error:
            return
        self.runner_pid = runner

        def watch() -> None:
            while True:
                time.sleep(poll_s)
                try:
                    gone = launcher.ppid() != runner  # the orphaned launcher was given another parent
                except psutil.Error:
                    gone = True
                if gone:  # a Ctrl-C ends the runner too: seen late on a busy machine, it is no second signal
                    self.request(signal.SIGTERM, self._runner_exit(), repeat_exits=False, runner_gone=True)
                    return

        threading.Thread(target=watch, name="watch-deepspeed-runner", daemon=True).start()
