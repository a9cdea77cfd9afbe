"""API keys on a live server: which routes need one, the 401 answer, keys never in the logs."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from live_server import (
    bearer,
    live_server,
    make_app,
    metric,
    serve_process,
    wait_healthy,
)

from esm2cli.cli import cli
from esm2cli.config import ModelConfig, ServeConfig
from esm2cli.serve.auth import KeyChecker, checked_keys

KEY_A = "k-alpha-0123456789abcdef"


KEY_B = "k-bravo-fedcba9876543210"


@pytest.fixture(scope="module")
def keyed(tiny_model_dir):
    app = make_app(tiny_model_dir, api_keys=(KEY_A, KEY_B), max_wait_ms=1)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        wait_healthy(client)
        yield client


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "an API key is required"),
        (bearer("k-wrong-0123456789abcdef"), "invalid API key"),
        (bearer(KEY_A[:-1]), "invalid API key"),  # a prefix of a good key
        ({"authorization": f"Basic {KEY_A}"}, "invalid API key"),  # right key, wrong scheme
        ({"authorization": KEY_A}, "invalid API key"),  # no scheme
    ],
)
def test_missing_or_wrong_key_is_401_with_www_authenticate(keyed, headers, message):
    answer = keyed.post("/predict", json={"sequence": "MKV"}, headers=headers)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.json() == {"error": answer.json()["error"], "error_type": "AuthenticationError"}
    assert message in answer.json()["error"] and KEY_A not in answer.text


def test_two_authorization_headers_are_refused(keyed):
    answer = keyed.post(
        "/predict",
        json={"sequence": "MKV"},
        headers=[("authorization", f"Bearer {KEY_A}"), ("authorization", "Bearer nope")],
    )
    assert answer.status_code == 401


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
def test_each_key_is_accepted_and_the_scheme_is_case_insensitive(keyed, key):
    assert keyed.post("/predict", json={"sequence": "MKV"}, headers=bearer(key)).status_code == 200
    answer = keyed.post("/predict", json={"sequence": "MKV"}, headers={"authorization": f"bearer {key}"})
    assert answer.status_code == 200


def test_probes_are_open_and_everything_else_needs_the_key(keyed):
    for path in ("/health", "/live"):
        assert keyed.get(path).status_code == 200
        assert keyed.head(path).status_code == 200
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models", "/no/such/route"):
        assert keyed.get(path).status_code == 401, path  # unknown routes too: nothing to probe without a key
        assert keyed.get(path, headers=bearer(KEY_A)).status_code == (404 if path == "/no/such/route" else 200)
    assert keyed.post("/predict/batch", json={"sequences": ["MKV"]}).status_code == 401


def test_v1_answers_401_in_openai_shape(keyed):
    answer = keyed.post("/v1/embeddings", json={"input": "MKV", "model": "x"})
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    error = answer.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert "API key" in error["message"]


def test_401s_are_counted(keyed):
    before = metric(keyed, 'esm2cli_requests_total{endpoint="/predict",status="401"}', bearer(KEY_A))
    keyed.post("/predict", json={"sequence": "MKV"})
    after = metric(keyed, 'esm2cli_requests_total{endpoint="/predict",status="401"}', bearer(KEY_A))
    assert after == before + 1


def test_public_metrics_and_docs_open_only_those(tiny_model_dir):
    app = make_app(tiny_model_dir, api_keys=(KEY_A,), public_metrics=True, public_docs=True)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        assert client.post("/predict", json={"sequence": "MKV"}).status_code == 401
        assert client.get("/v1/models").status_code == 401


def test_without_keys_everything_answers_and_the_server_says_it_is_open(tiny_model_dir, caplog):
    with live_server(make_app(tiny_model_dir)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/openapi.json").status_code == 200
    assert any("no API key is set" in r.getMessage() for r in caplog.records)


def test_key_checker_accepts_exactly_its_keys():
    checker = KeyChecker([KEY_A, KEY_B])
    assert checker.accepts(f"Bearer {KEY_A}".encode()) and checker.accepts(f"BEARER  {KEY_B} ".encode())
    for value in (None, b"", b"Bearer", b"Bearer ", f"Bearer {KEY_A}x".encode(), f"Token {KEY_A}".encode()):
        assert not checker.accepts(value), value
    assert not KeyChecker([]).needs_key("/predict") and KeyChecker([KEY_A]).needs_key("/predict")
    assert KEY_A not in repr(checker)


def test_identify_names_the_matching_key_by_its_digest():
    checker = KeyChecker([KEY_A, KEY_B])
    assert checker.identify(f"Bearer {KEY_B}".encode()) == hashlib.sha256(KEY_B.encode()).digest()
    assert checker.identify(f"bearer {KEY_A}".encode()) == hashlib.sha256(KEY_A.encode()).digest()
    assert checker.identify(f"Basic {KEY_A}".encode()) is None and checker.identify(None) is None
    assert KeyChecker([]).identify(f"Bearer {KEY_A}".encode()) is None


@pytest.mark.parametrize(
    "keys, message",
    [(["k-tiny-1"], "API key #1 is too short"), ([KEY_A, "has a space in it!!"], "API key #2 holds a character")],
)
def test_bad_keys_are_refused_naming_their_position_only(keys, message):
    from esm2cli.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as info:
        checked_keys(keys)
    assert all(key not in str(info.value) for key in keys)


def test_cli_refuses_a_short_key_with_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--api-key", "tooshort"])
    assert result.exit_code == 2 and "too short" in result.output and "tooshort" not in result.output


def test_cli_keys_from_options_env_and_file_never_logged_and_access_log_on_stderr(tiny_model_dir, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# rotated monthly\n\n{KEY_B}\n")
    key_env = "k-env-key-0123456789abcd"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESM2CLI_")}
    env["ESM2CLI_API_KEYS"] = f"{key_env},{KEY_A}"
    args = ["-m", tiny_model_dir, "--devices", "cpu", "--dtype", "float32", "--api-key-file", str(key_file)]
    log = tmp_path / "stderr.log"
    proc, port = serve_process(args, log, env=env, stdout=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_healthy(client, timeout=120)
            for key in (key_env, KEY_A, KEY_B):
                answer = client.post("/predict?token=QUERYSECRET", json={"sequence": "MKV"}, headers=bearer(key))
                assert answer.status_code == 200, key
            wrong = client.post("/predict", json={"sequence": "MKV"}, headers=bearer("k-wrong-0123456789ab"))
            assert wrong.status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.stdout.read(), log.read_text()
    assert out == ""  # stdout is for data; the access log goes to stderr
    assert "api_keys=<3 redacted>" in err
    assert '"POST /predict" 200' in err and '"POST /predict" 401' in err
    for secret in (key_env, KEY_A, KEY_B, "k-wrong", "QUERYSECRET", "token="):
        assert secret not in err, secret
    assert "no API key is set" not in err


@pytest.mark.parametrize("text", ["", "\n\n", "# the key goes here\n  \n#another\n"])
def test_cli_refuses_an_api_key_file_without_a_key(tmp_path, text):
    key_file = tmp_path / "keys"
    key_file.write_text(text)
    result = CliRunner().invoke(cli, ["serve", "--api-key-file", str(key_file)])
    assert result.exit_code == 2, result.output
    assert "holds no key" in result.output and str(key_file) in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_read_key_file_refuses_a_file_of_comments_only(tmp_path):
    from esm2cli.errors import ConfigError
    from esm2cli.serve.auth import read_key_file

    (tmp_path / "keys").write_text("# none yet\n")
    with pytest.raises(ConfigError, match="holds no key"):
        read_key_file(tmp_path / "keys")


def test_the_startup_log_line_is_readable_and_holds_no_key():
    from esm2cli.config import describe

    line = describe(ServeConfig(api_keys=(KEY_A, KEY_B), max_queue=16))
    assert "max_queue=16" in line and "api_keys=<2 redacted>" in line
    assert KEY_A not in line and KEY_B not in line and "Config(" not in line
    assert (
        describe(ModelConfig(model="esm2_t6_8M"))
        == "model=esm2_t6_8M, load_format=auto, dtype=auto, devices=auto, simulate=-"
    )


def test_an_empty_api_keys_variable_refuses_to_serve(tiny_model_dir, tmp_path, reap):
    # A Kubernetes Secret whose key is empty renders ESM2CLI_API_KEYS="" (the variable is set): the user
    # asked for keys, as with an empty --api-key-file, which exits 2. Here the server starts without any.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "ESM2CLI_API_KEYS": ""}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "esm2cli", "serve", "-m", tiny_model_dir, "--devices", "cpu", "--port", "0"],
            stderr=log, env=env,
        )  # fmt: skip
    reap(proc)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if "Uvicorn running" in log_path.read_text():
            break  # it serves: the defect
        time.sleep(0.05)
    assert proc.poll() == 2, f"the server started without keys: {log_path.read_text()[-500:]}"


def test_a_key_file_with_a_byte_order_mark_gives_its_key(tmp_path):
    from esm2cli.serve.auth import checked_keys, read_key_file

    key = "k3y-" + "a" * 28
    path = tmp_path / "keys"
    path.write_bytes(b"\xef\xbb\xbf" + key.encode() + b"\r\n")  # as Windows editors save it
    assert checked_keys(read_key_file(path)) == (key,)
