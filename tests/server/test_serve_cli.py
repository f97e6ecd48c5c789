"""``infercc serve`` as a user runs it: a subprocess that prints its URL, serves, and on SIGTERM
stops taking connections, finishes the stream in flight, and exits 0. Bad options are one-line
errors."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from infercc.cli import main
from tests.importers._models import STORIES, require

ROOT = Path(__file__).resolve().parents[2]
START_SECONDS = 90


def start(*args: str, log: Path) -> tuple[subprocess.Popen, str]:
    """The server process and its URL (from the line it prints once it listens)."""
    process = subprocess.Popen([sys.executable, "-m", "infercc.cli", "serve", *args], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=log.open("w"))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        found = re.search(r"serving 'stories' at (http://\S+)/v1 ", line)
        if found:
            return process, found.group(1)
    process.kill()
    raise AssertionError(f"infercc serve did not start: {log.read_text()[-2000:]}")


def test_sigterm_finishes_the_stream_in_flight_then_exits(tmp_path):
    log = tmp_path / "serve.log"
    process, url = start(str(require(STORIES)), "--port", "0", "--model-name", "stories", log=log)
    try:
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 1200, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    break
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # draining: no new connections
                httpx.get(url + "/health", timeout=5)
            events += [line[6:] for line in lines if line.startswith("data: ")]
        assert process.wait(timeout=60) == 0, log.read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 1200  # the whole answer, not cut by the stop
    assert "stopped: every request in flight finished" in log.read_text()


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--api-key", " "], "--api-key is empty"),
    (["--max-batch-tokens", "0"], "Config.max_batch_tokens must be an integer >= 1, got 0"),
    (["--kv-cache-memory", "-1"], "Config.kv_cache_memory must be an integer >= 0, got -1"),
])
def test_bad_options_are_one_line_errors(capsys, args, message):
    assert main(["serve", str(require(STORIES)), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_missing_model_is_an_error(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "missing.gguf")]) == 1
    assert "missing.gguf" in capsys.readouterr().err.strip().splitlines()[-1]
