"""esm2cli serve as a process: SIGTERM drains what is in flight and exits 0; a failed startup exits 1, with the
traceback kept when the failure is a bug."""

import os
import signal
import subprocess
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from click.testing import CliRunner
from live_server import metric, serve_process, wait_healthy

from esm2cli.cli import cli
from esm2cli.errors import ModelLoadError


def test_sigterm_drains_requests_in_flight_and_exits_0(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESM2CLI_")}
    # A generous grace (and request timeout): on a loaded 2-core machine the 12 requests can take longer than the
    # defaults of 30 s (and 60 s), and what is tested here is that they are drained, not how fast.
    args = ["-m", "esm2_t12_35M", "--load-format", "dummy", "--dtype", "float32", "--devices", "cpu",
            "--max-batch-size", "4", "--graceful-timeout", "600", "--request-timeout", "600"]  # fmt: skip
    log = tmp_path / "stderr.log"
    proc, port = serve_process(args, log, env=env, stdout=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            wait_healthy(client, timeout=120)
            seq = "MKTAYIAKQRQISFVKSHFSRQ" * 40  # ~900 residues: each batch takes a while on the CPU

            def one(k):
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as own:
                    return own.post("/predict", json={"sequence": seq, "id": str(k)})

            with ThreadPoolExecutor(12) as executor:
                futures = [executor.submit(one, k) for k in range(12)]
                deadline = time.time() + 60  # until every request is accepted (pending) or answered
                while _pending_or_done(client) < 12:
                    assert time.time() < deadline, "the requests never reached the server"
                    time.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                answers = [f.result() for f in futures]
        assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers if a.status_code != 200]
        assert sorted(a.json()["id"] for a in answers) == sorted(str(k) for k in range(12))
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Shutting down" in log.read_text()


def _pending_or_done(client) -> float:
    done = metric(client, 'esm2cli_requests_total{endpoint="/predict",status="200"}')
    return metric(client, "esm2cli_pending_sequences") + done


@pytest.fixture
def own_signal_handlers():
    """esm2cli serve installs SIGTERM/SIGINT handlers; the test process gets its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize(
    "error, bug",
    [(ModelLoadError("cannot load the weights: truncated file"), False), (ZeroDivisionError("oops"), True)],
)
def test_a_failed_startup_exits_1_and_a_bug_keeps_its_traceback(tiny_model_dir, monkeypatch, own_signal_handlers,
                                                                  error, bug):  # fmt: skip
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr("esm2cli.serve.service.build_server_engine", broken)
    args = ["serve", "-m", tiny_model_dir, "--devices", "cpu", "--dtype", "float32", "--port", "0", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    if bug:
        assert result.exception is error  # raised as it is: Python prints its traceback
        assert any(frame.name == "broken" for frame in traceback.extract_tb(result.exc_info[2]))
    else:
        assert isinstance(result.exception, SystemExit)  # Click's one line, no traceback
        assert "cannot load the weights: truncated file" in result.output and "Traceback" not in result.output
