"""A multi-process run's process under a watchful parent: bounded, one-line failures.

JAX's distributed runtime ends a process whose peer died, stopped answering or never joined with
a fatal error of its C++ runtime (SIGABRT and a stack dump), once its heartbeat or initialization
timeout has passed; Python cannot catch it. So ``jaxnet train`` in a multi-process run starts the
same command again as its child and watches it: the child's standard output passes straight
through, its standard error line by line until the runtime's fatal report begins (kept out of the
terminal, and summed up in one line naming the cause), and SIGINT/SIGTERM are forwarded to it.
The child runs in a session of its own, so a terminal's Ctrl-C reaches it once, through here.

Nothing here imports jax.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Sequence

SUPERVISED_ENV = "JAXNET_SUPERVISED"
"""Set in the child's environment: the process that trains."""

_FATAL = re.compile(r"^(F\d{4} \d\d:\d\d|\*\*\* |terminate called|Check failure)")
"""The first line of the runtime's fatal report (an absl fatal log line, a C++ abort)."""
_LOGGED = re.compile(r"^[EW]\d{4} \d\d:\d\d")
"""An absl error or warning line of the runtime: held back, shown unless the run ends in a peer's failure."""
_ERROR = "jaxnet: error: "
_FORWARDED = (signal.SIGINT, signal.SIGTERM)


def is_supervised() -> bool:
    """True in the child that a supervisor started."""
    return bool(os.environ.get(SUPERVISED_ENV))


def bind_to_supervisor() -> None:
    """In the child: end with the supervisor, so that a ``kill -9`` of the process a user started
    never leaves its training running (Linux's parent-death signal; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if str(os.getppid()) != os.environ.get(SUPERVISED_ENV):  # it died before the line above
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _failure(text: str) -> str | None:
    """Which failure of a run the runtime's ``text`` reports: ``"peer"`` (one stopped answering),
    ``"join"`` (one never joined) or None (something else)."""
    text = " ".join(text.split())
    if any(sign in text for sign in ("heartbeat", "UNAVAILABLE", "Socket closed", "Connection closed by peer")):
        return "peer"
    if "DEADLINE_EXCEEDED" in text or "RegisterTask" in text:
        return "join"
    return None


def cause(report: str, timeout: int) -> str:
    """One line for the runtime's fatal ``report``: which failure of the run it means, and the fix."""
    failure = _failure(report)
    if failure == "peer":
        return (
            f"a peer process of this run stopped answering (no heartbeat within {timeout} s), so this process "
            "stops too: restart every process with the same command to continue from the last checkpoint"
        )
    if failure == "join":
        return (
            f"not every process joined the run within {timeout} s: start all of them (same --coordinator "
            "and --num-processes, each its own --process-id), or give them longer (--peer-timeout)"
        )
    first = next((line for line in report.splitlines() if _FATAL.match(line)), report.strip()[:300])
    return f"the distributed runtime stopped this process: {first.strip()}"


def supervise(argv: Sequence[str], timeout: int, debug: bool = False) -> int:
    """Runs ``python -m jaxnet.app argv`` as a watched child; returns its exit code (1, with one
    line on stderr, when the distributed runtime aborted it; 128 + N when signal N ended it).
    With ``debug`` the runtime's own report is shown before that line."""
    import subprocess  # (here: the command line imports this module for its --help)

    child = subprocess.Popen(
        [sys.executable, "-m", "jaxnet.app", *argv],
        env=dict(os.environ, **{SUPERVISED_ENV: str(os.getpid())}),
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    previous = {s: signal.signal(s, lambda signum, frame: child.send_signal(signum)) for s in _FORWARDED}
    try:
        report, held, errors = _relay(child.stderr)
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code in (-signal.SIGINT, -signal.SIGTERM):
        return 128 - code
    everything = report + "".join(held + errors)
    if code != 0 and (code == -signal.SIGABRT and report or _failure(everything) is not None):
        if debug:
            sys.stderr.writelines([*held, report])
        sys.stderr.write(f"{_ERROR}{cause(everything, timeout)}\n")
        return 1
    sys.stderr.writelines([*held, report, *errors])  # late, but nothing is lost
    if code < 0:
        sys.stderr.write(f"{_ERROR}the training process was killed by {signal.Signals(-code).name}\n")
        return 1
    return code


def _relay(stream) -> tuple[str, list[str], list[str]]:
    """Copies ``stream`` to stderr as it comes, except: the runtime's fatal report (from its first
    line on), its logged errors and warnings, and the child's own error lines, which are returned
    as ``(report, held, errors)``."""
    report: list[str] = []
    held: list[str] = []
    errors: list[str] = []
    for line in stream:
        if line.startswith(_ERROR):
            errors.append(line)
        elif report or _FATAL.match(line):
            report.append(line)
        elif _LOGGED.match(line):
            held.append(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()
    return "".join(report), held, errors
