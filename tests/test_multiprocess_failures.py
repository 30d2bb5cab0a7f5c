"""A multi-process run fails cleanly: when a peer dies, stops or never joins, every process ends
within the peer timeout's bound with one line and exit 1; SIGTERM to one process stops all of them
after the epoch's checkpoint with 143 (two processes on this machine, one CPU device each)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 5  # --peer-timeout
BOUND = 6 * TIMEOUT + 30  # start-up, the runtime's own retries, and shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(address: str, process: int, out: Path, epochs: int = 100000) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "jaxnet.app", "train", "--dataset", "digits", "--epochs", str(epochs)]
    command += ["--coordinator", address, "--num-processes", "2", "--process-id", str(process)]
    command += ["--peer-timeout", str(TIMEOUT), "--checkpoint-every", "1", "--out", str(out)]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_training(out: Path) -> None:
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists():
        assert time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.2)


def finish(proc: subprocess.Popen, start: float) -> tuple[int, str, float]:
    _, err = proc.communicate(timeout=BOUND + 60)
    return proc.returncode, err, time.monotonic() - start


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("jaxnet: error:")]
    assert len(lines) == 1 and "Traceback" not in err and "@ 0x" not in err and "F1" not in err[:2], err
    return lines[0]


@pytest.mark.slow
def test_a_peer_that_never_joins(tmp_path):
    began = time.monotonic()
    code, err, took = finish(start(f"127.0.0.1:{free_port()}", 0, tmp_path / "run"), began)
    assert code == 1 and took < BOUND, (code, took, err)
    assert "not every process joined the run within 5 s" in one_line(err)


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1])
def test_a_peer_killed_mid_run(tmp_path, killed):
    address = f"127.0.0.1:{free_port()}"
    procs = [start(address, i, tmp_path / "run") for i in range(2)]
    wait_for_training(tmp_path / "run")
    procs[killed].kill()  # kill -9 of the process the user started (its training child goes with it)
    began = time.monotonic()
    survivor = procs[1 - killed]
    code, err, took = finish(survivor, began)
    procs[killed].communicate()
    assert code == 1 and took < BOUND, (code, took, err)
    assert "stopped answering" in one_line(err) or "distributed runtime stopped" in one_line(err), err


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_a_checkpoint(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    procs = [start(address, i, tmp_path / "run") for i in range(2)]
    wait_for_training(tmp_path / "run")
    began = time.monotonic()
    procs[0].send_signal(signal.SIGTERM)
    results = [finish(p, began) for p in procs]
    for code, err, took in results:
        assert code == 143 and took < BOUND, (code, took, err)
        assert "Traceback" not in err, err
    assert any((tmp_path / "run" / "checkpoints").iterdir())


def test_the_runtimes_reports_are_named_in_one_line():
    from jaxnet.app.supervisor import cause

    heartbeat = "E1204 18:38:26.56 coordination_service.cc:1549] UNAVAILABLE: Task 1 heartbeat timeout.\n"
    assert cause(heartbeat, 30).startswith("a peer process of this run stopped answering (no heartbeat within 30 s)")
    connect = "F1204 18:40:01.2 client.cc:88] Check failed: DEADLINE_EXCEEDED: Connect to coordination service\n"
    assert cause(connect, 7).startswith("not every process joined the run within 7 s")
    other = "noise\nF1204 18:41:00.0 x.cc:1] something else broke\n*** Check failure stack trace: ***\n"
    expected = "the distributed runtime stopped this process: F1204 18:41:00.0 x.cc:1] something else broke"
    assert cause(other, 30) == expected


def test_a_bad_peer_timeout_is_one_line_naming_the_flag(capsys, monkeypatch):
    from jaxnet.app import cli, supervisor

    monkeypatch.setenv(supervisor.SUPERVISED_ENV, "1")  # as the watched child, which checks before joining
    monkeypatch.setattr(supervisor, "bind_to_supervisor", lambda: None)
    argv = ["train", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0", "--peer-timeout", "0"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "jaxnet: error: --peer-timeout must be a positive integer, got 0\n"
