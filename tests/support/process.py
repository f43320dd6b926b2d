"""A subprocess whose stderr lines can be awaited: the one logged-process helper.

A thread pumps the process's stderr into a queue (and, if given, a log file),
so a test waits for a log line instead of sleeping; ``stop`` ends it with
SIGTERM, then SIGKILL after a timeout. The router fixtures, the mesh and the
benches all start their processes through it.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
from pathlib import Path


class LoggedProcess:
    """``cmd`` started with its stderr readable line by line (stdout is discarded unless
    ``with_stdout``)."""

    def __init__(self, name: str, cmd: list[str], log_path: Path | None = None, *,
                 cwd: Path | None = None, env: dict[str, str] | None = None,
                 failure: type[Exception] = AssertionError, with_stdout: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        self.failure = failure  # what wait_for_log raises (benches want their own error)
        # with_stdout: stdout's lines are read as log lines too (what `jobmesh up` prints)
        self.proc = subprocess.Popen(cmd, cwd=cwd,
                                     stdout=subprocess.PIPE if with_stdout else subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT if with_stdout else subprocess.PIPE,
                                     text=True,
                                     env={**(os.environ if env is None else env),
                                          "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        stream = self.proc.stderr or self.proc.stdout
        assert stream is not None
        log = self.log_path.open("a") if self.log_path is not None else None
        try:
            for line in stream:
                if log is not None:
                    log.write(line)
                    log.flush()
                self.lines.put(line.rstrip("\n"))
        finally:
            if log is not None:
                log.close()

    def wait_for_log(self, pattern: str, timeout: float = 30, *,
                     consume: bool = False) -> re.Match[str]:
        """Block until a log line matches (one seen already counts); fail with the log's
        tail if none does in time. With ``consume`` a matching line is returned once only,
        so the next wait for the same pattern waits for a new line."""
        regex = re.compile(pattern)
        for line in self.seen:
            if m := regex.search(line):
                if consume:
                    self.seen.remove(line)
                return m
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise self.failure(f"{self.name} never logged {pattern!r} (exit "
                                   f"{self.proc.poll()}); log:\n"
                                   + "\n".join(self.seen[-40:])) from None
            if m := regex.search(line):
                if not consume:
                    self.seen.append(line)
                return m
            self.seen.append(line)

    def log_lines(self) -> list[str]:
        """Every line it logged so far (those not yet waited for included)."""
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.seen

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, and SIGKILL if it has not exited within ``timeout``; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
