"""EdgeRuntime: embedder + generator + index in one process, memory accounting, search/ask."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from test_rag_fakes import HashEmbedder  # noqa: E402
from test_rag_prompt import FakeGenerator  # noqa: E402

from edge.runtime.host import EdgeRuntime  # noqa: E402
from rag.ask import NOT_COVERED  # noqa: E402
from rag.ingest import ingest  # noqa: E402


def test_runtime_hosts_all_three_and_reports_memory(tmp_path, monkeypatch):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "codes.md").write_text("# Codes\n\n## E-214\n\nE-214: coolant pressure low. Check the hose.\n")
    ingest(d, embedder=HashEmbedder(), progress=False)

    bundle = tmp_path / "gen-bundle"
    bundle.mkdir()
    (bundle / "weights.bin").write_bytes(b"\0" * 123_456)
    import json

    from edge.bundle import Limits, Manifest, Quant
    from edge.models.spec import ModelSpec
    from edge.plan import kv_bytes_per_token

    spec = ModelSpec("llama", n_layers=1, hidden_size=64, intermediate_size=128, n_heads=2, n_kv_heads=1, head_dim=25,
                     vocab_size=256, max_position=2048)
    assert kv_bytes_per_token(spec, "fp16") == 100
    manifest = Manifest(kind="generator", model=spec.to_dict(), quant=Quant("int4", 32), planned_weight_bytes=100_000_000,
                        limits=Limits(max_context=1000, kv_dtype="fp16"),
                        plan={"budget": {"embedder": 1000, "embedder_workspace": 500, "index": 4000, "workspace": 7}})
    (bundle / "manifest.json").write_text(manifest.to_json())
    keep = []

    class FakeGeneratorClass:
        @staticmethod
        def from_bundle(path, backend="auto"):
            assert Path(path) == bundle and backend == "onnxruntime"
            keep.append(np.ones(64 << 20, np.uint8))  # 64 MiB resident "weights"
            return FakeGenerator()

    import edge.runtime.generator as genmod

    monkeypatch.setattr(genmod, "Generator", FakeGeneratorClass)
    rt = EdgeRuntime(embedder=HashEmbedder(), generator_path=bundle, backend="onnxruntime", progress=False)
    rt.retriever.min_cosine, rt.retriever.min_cosine_with_keywords = 0.8, 0.5
    assert "generator" not in rt.parts  # lazy: search never loads it
    assert rt.search("E-214", k=1).hits[0].chunk.path == "docs/codes.md"
    # an off-topic question is refused without loading the generator
    assert rt.ask("Who painted the Mona Lisa?").text == NOT_COVERED and "generator" not in rt.parts
    a = rt.ask("What does E-214 mean?", k=1, max_tokens=20)
    assert a.covered and a.cited == [1]
    rep = rt.memory_report()
    parts = {p["name"]: p for p in rep["parts"]}
    assert set(parts) == {"index", "generator"}
    g = parts["generator"]
    assert g["file_bytes"] == 123_456 + len((bundle / "manifest.json").read_bytes())
    assert g["planned_bytes"] == 100_000_000 + 100 * 1000 + 7 and not g["over_plan"]
    assert parts["index"]["planned_bytes"] == 4000 and rep["planned_bytes"] == 100_000_000 + 100_007 + 4000
    assert g["rss_delta_bytes"] >= 60 << 20  # the 64 MiB allocated while loading
    assert rep["rss_bytes"] >= rep["loaded_bytes"] > 0
    assert parts["index"]["file_bytes"] > 0
    rt.close()
