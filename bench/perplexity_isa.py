"""Perplexity per CPU: the same engine bundles on this CPU and on an emulated AVX2-only x86, against
the numpy reference on the same weights.

    python bench/perplexity_isa.py --bundle vnni-build=PATH --bundle avx2-build=PATH \
        [--tokens 512] [--window 256] [--qemu-cpu Haswell] [--native]

ONNX Runtime's kernels (MLAS) are chosen from cpuid when the library loads; there is no option to
force a narrower ISA, so the AVX2 rows run the engine under `qemu-x86_64 -cpu Haswell` (Debian's
qemu-user: AVX2 and FMA, no AVX-512, no VNNI), which makes MLAS take its AVX2 kernels. The
reference is the numpy forward on the bundle's dequantized weights (float32; the same on any CPU).
Held-out tokens: bench.perplexity.heldout_windows (the last 20% of pydoc_data.topics).
One JSON line per (bundle, cpu), with the graph's int8 LM head kernel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _engine_only(bundle: str, tokens: int, window: int, out: str) -> None:
    from bench.perplexity import heldout_windows
    from bench.perplexity_gguf import nll_engine

    np.save(out, nll_engine(Path(bundle), heldout_windows(Path(bundle), tokens, window), threads=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", action="append", default=[], help="label=PATH (repeat)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--qemu-cpu", default="Haswell", help="emulated CPU for the AVX2 rows ('' = none)")
    ap.add_argument("--native", action="store_true", help="also the native backend on this CPU (what `auto` runs on x86 "
                    "with AVX2; EDGE_RAG_NATIVE_ISA=avx2 runs an AVX2-only CPU's code)")
    ap.add_argument("--engine-only", nargs=2, metavar=("BUNDLE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_only:
        return _engine_only(args.engine_only[0], args.tokens, args.window, args.engine_only[1])

    import onnxruntime as ort

    from bench.perplexity import heldout_windows, nll_reference
    from edge.bundle import Bundle
    from edge.cpu import isa_summary

    py = os.path.realpath(sys.executable)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *(p for p in sys.path if p)])}  # qemu runs the real binary
    for label, path in (b.split("=", 1) for b in args.bundle):
        b = Bundle.open(path, verify=False)
        meta = ort.InferenceSession(str(b.file("model.ort.onnx")), providers=["CPUExecutionProvider"]).get_modelmeta()
        head = meta.custom_metadata_map.get("int8_head")
        if head is None:  # graphs built before the metadata: read the op
            import onnx

            ops = {n.op_type for n in onnx.load(str(b.file("model.ort.onnx")), load_external_data=False).graph.node}
            head = "DynamicQuantizeMatMul" if "DynamicQuantizeMatMul" in ops else "MatMulNBits"
        t = time.time()
        ref = nll_reference(Path(path), heldout_windows(Path(path), args.tokens, args.window))
        ppl_ref = math.exp(ref.mean())
        cpus = [("this CPU " + ("VNNI" if isa_summary()["vnni"] else "no VNNI"), [])]
        if args.qemu_cpu:
            cpus.append((f"qemu -cpu {args.qemu_cpu}", ["qemu-x86_64", "-cpu", args.qemu_cpu]))
        if args.native:
            from bench.perplexity_gguf import nll_native
            from edge.runtime.cpu.build import forced_isa

            t = time.time()
            nll = nll_native(Path(path), heldout_windows(Path(path), args.tokens, args.window), threads=2)
            ppl = math.exp(nll.mean())
            print(json.dumps({"bench": "perplexity_isa", "bundle": label, "recipe": b.manifest.quant.recipe, "backend": "native",
                              "native_isa": forced_isa()[0] or "best of this CPU", "cpu": cpus[0][0],
                              "tokens_scored": int(nll.size), "ppl_engine": round(ppl, 4), "ppl_reference": round(ppl_ref, 4),
                              "vs_reference": f"{100 * (ppl / ppl_ref - 1):+.2f}%", "seconds": round(time.time() - t, 1)}), flush=True)
        for cpu, prefix in cpus:
            out = f"/tmp/ppl-isa-{os.getpid()}-{label}.npy"
            t = time.time()
            subprocess.run([*prefix, py, __file__, "--tokens", str(args.tokens), "--window", str(args.window),
                            "--engine-only", path, out], env=env, check=True)
            nll = np.load(out)
            os.unlink(out)
            ppl = math.exp(nll.mean())
            print(json.dumps({"bench": "perplexity_isa", "bundle": label, "recipe": b.manifest.quant.recipe,
                              "accuracy_level": b.manifest.quant.accuracy_level,
                              "int8_head": head, "cpu": cpu, "tokens_scored": int(nll.size), "ppl_engine": round(ppl, 4),
                              "ppl_reference": round(ppl_ref, 4), "vs_reference": f"{100 * (ppl / ppl_ref - 1):+.2f}%",
                              "seconds": round(time.time() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
