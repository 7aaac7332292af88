"""What a batched ONNX Runtime decode step costs per op, by batch size (issue 9's 8/1 scaling).

For a generator bundle, this times (process CPU time, both intra-op threads summed, spinning
off, so the figure is work done and holds up under load) each distinct MatMulNBits shape of the
bundle's graph at M = 1, 8 and 16 rows, its GroupQueryAttention node at batch 1 and 8 over a
given past, and the whole decode step of the bundle's session at batch 1 and 8. It prints one JSON
line per figure and the scaling bound the ops imply: 8 x t(1) / t(8) for the step.

    python bench/bench_ort_ops.py --engine BUNDLE [--threads 2] [--past 64,256] [--alternatives]

--alternatives adds `linear_alternative` lines: other ORT kernels for the same weights, with
whether each keeps a batched row bitwise equal to the row alone (see alternatives()).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np


def cpu_us(fn, n: int = 20, rounds: int = 3) -> float:
    """Least process CPU time per call over `rounds` runs of n calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t) / n * 1e6)
    return best


def one_node_session(node, inputs, initializers, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import helper as h

    outs = [h.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in node.output if o]
    g = h.make_graph([node], "op", inputs, outs, initializer=initializers)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9  # what onnxruntime >= 1.20 loads (onnx writes its newest IR: 1.23 writes one that onnxruntime 1.30 refuses)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def matmulnbits(graph, threads: int):
    """Each distinct (K, N, bits, block) MatMulNBits of the graph at M = 1, 8, 16, random weights."""
    import onnx
    from onnx import helper as h

    attrs = lambda n: {a.name: h.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    shapes = Counter()
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            a = attrs(n)
            shapes[(a["K"], a["N"], a["bits"], a["block_size"], a.get("accuracy_level", 0))] += 1
    rng = np.random.default_rng(0)
    for (k, n_out, bits, block, level), count in sorted(shapes.items()):
        blocks = k // block
        w = rng.integers(0, 256, (n_out, blocks, block * bits // 8), dtype=np.uint8)
        s = (rng.random(n_out * blocks) * 0.01).astype(np.float32)
        node = h.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n_out, bits=bits,
                           block_size=block, accuracy_level=level)
        sess = one_node_session(node, [h.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["M", k])],
                                [onnx.numpy_helper.from_array(w, "b"), onnx.numpy_helper.from_array(s, "s")], threads)
        t = {}
        for m in (1, 8, 16):
            a = rng.random((m, k), dtype=np.float32)
            t[m] = cpu_us(lambda: sess.run(None, {"a": a}))
        yield {"figure": "matmulnbits", "K": k, "N": n_out, "bits": bits, "block": block, "accuracy_level": level,
               "per_step": count, "cpu_us": {str(m): round(v, 1) for m, v in t.items()},
               "m8_over_m1": round(t[8] / t[1], 2), "gmac_per_cpu_s_m8": round(k * n_out * 8 / t[8] / 1e3, 1)}


def alternatives(graph, threads: int, ms: tuple[int, ...] = (1, 8, 16, 32)):
    """Other ONNX Runtime kernels for the same int4 g32 weights, per distinct linear shape and the LM
    head [hidden x vocab], at M = 1, 8, 16, 32 rows (issue 9: is there a pure-ORT batched path?):

      nb4    MatMulNBits bits 4 (the graph's kernel; accuracy level 4: int8 activations per block)
      nb8    MatMulNBits bits 8 holding the same int4 values (q + 120, zero point 128): the same
             dequantized weights, twice the bytes
      dqmm8  DynamicQuantizeMatMul on an int8 per-channel re-quantization (MLAS u8s8 QGEMM,
             prepacked B): a different rounding of the weights, one activation scale per call
      f32    MatMul on the dequantized float32 weights (4 bytes a weight)

    Per kernel: process CPU time per call, GMAC per CPU-second at 8 and 32 rows, the largest
    difference from nb4 at 8 rows, whether a row batched with 7 others is bitwise the row alone
    (what the engine's batched == alone guarantee needs), and the weight bytes it holds."""
    import onnx
    from onnx import helper as h
    from onnx import numpy_helper as nh

    attrs = lambda n: {a.name: h.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    shapes = {}
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            a = attrs(n)
            shapes.setdefault((a["K"], a["N"], a["block_size"]), "linear")
    logits = next((o for o in graph.output if o.name == "logits"), None)
    vocab = int(logits.type.tensor_type.shape.dim[1].dim_value) if logits is not None else 0
    if vocab and shapes:  # the LM head: [hidden x vocab] (hidden: the smallest K, every block's input width)
        shapes.setdefault((min(k for k, _, _ in shapes), vocab, 32), "lm_head")
    rng = np.random.default_rng(0)
    f = onnx.TensorProto.FLOAT

    def session(node, k, inits):
        return one_node_session(node, [h.make_tensor_value_info("a", f, ["M", k])], inits, threads)

    for (k, n_out, bs), role in shapes.items():
        nb = k // bs
        q = rng.integers(0, 16, (n_out, nb, bs), dtype=np.uint8)  # int4 values, zero point 8
        s = (rng.random((n_out, nb)) * 0.01 + 0.001).astype(np.float32)
        w = ((q.astype(np.float32) - 8) * s[..., None]).reshape(n_out, k)
        sc = np.abs(w).max(1) / 127
        wq = np.clip(np.round(w / sc[:, None]), -127, 127).astype(np.int8)
        ms_node = lambda bits: h.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n_out,  # noqa: E731
                                           bits=bits, block_size=bs, accuracy_level=4)
        kernels = {
            "nb4": (session(ms_node(4), k, [nh.from_array((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), "b"),
                                            nh.from_array(s.reshape(-1), "s")]), k * n_out // 2 + s.nbytes),
            "nb8": (session(ms_node(8), k, [nh.from_array((q.astype(np.int16) + 120).astype(np.uint8), "b"),
                                            nh.from_array(s.reshape(-1), "s")]), k * n_out + s.nbytes),
            "dqmm8": (session(h.make_node("DynamicQuantizeMatMul", ["a", "b", "s"], ["y"], domain="com.microsoft"), k,
                              [nh.from_array(np.ascontiguousarray(wq.T), "b"), nh.from_array(sc.astype(np.float32), "s")]), k * n_out + 4 * n_out),
            "f32": (session(h.make_node("MatMul", ["a", "b"], ["y"]), k, [nh.from_array(np.ascontiguousarray(w.T), "b")]), 4 * k * n_out),
        }
        a = {m: rng.standard_normal((m, k)).astype(np.float32) for m in ms}
        ref8 = kernels["nb4"][0].run(None, {"a": a[8]})[0]
        for name, (sess, nbytes) in kernels.items():
            t = {m: cpu_us(lambda: sess.run(None, {"a": a[m]}), n=10 if n_out > 10000 else 30) for m in ms}
            y8 = sess.run(None, {"a": a[8]})[0]
            alone = np.concatenate([sess.run(None, {"a": a[8][i:i + 1]})[0] for i in range(8)])
            yield {"figure": "linear_alternative", "role": role, "K": k, "N": n_out, "kernel": name,
                   "cpu_us": {str(m): round(v, 1) for m, v in t.items()}, "m8_over_m1": round(t[8] / t[1], 2),
                   "gmac_per_cpu_s": {str(m): round(k * n_out * m / t[m] / 1e3, 1) for m in ms if m > 1},
                   "max_abs_diff_vs_nb4_m8": float(np.abs(y8 - ref8).max()), "ref_max_abs_m8": float(np.abs(ref8).max()),
                   "rows_batched_equal_alone": bool(np.array_equal(y8, alone)), "weight_mib": round(nbytes / 2**20, 2)}


def attention(graph, threads: int, pasts: list[int], ctx: int = 2048):
    import onnx
    from onnx import helper as h

    gqa = next(n for n in graph.node if n.op_type == "GroupQueryAttention")
    a = {x.name: h.get_attribute_value(x) for x in gqa.attribute}
    heads, kv = a["num_heads"], a["kv_num_heads"]
    cos = next(i for i in graph.initializer if i.name == gqa.input[7])
    half = cos.dims[1]
    d = half * 2
    width = (heads + 2 * kv) * d
    node = h.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "sl", "tot", "cos", "sin"], ["out", "prk", "prv"],
                       domain="com.microsoft", **a)
    f = onnx.TensorProto.FLOAT
    ins = [h.make_tensor_value_info("qkv", f, ["B", "S", width]), h.make_tensor_value_info("pk", f, ["B", kv, ctx, d]),
           h.make_tensor_value_info("pv", f, ["B", kv, ctx, d]), h.make_tensor_value_info("sl", onnx.TensorProto.INT32, ["B"]),
           h.make_tensor_value_info("tot", onnx.TensorProto.INT32, []), h.make_tensor_value_info("cos", f, [ctx, half]),
           h.make_tensor_value_info("sin", f, [ctx, half])]
    sess = one_node_session(node, ins, [], threads)
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    for past in pasts:
        t = {}
        for b in (1, 8):
            k = rng.random((b, kv, ctx, d), dtype=np.float32)
            v = rng.random((b, kv, ctx, d), dtype=np.float32)
            io = sess.io_binding()
            for name, arr in (("pk", k), ("pv", v)):
                ov = ort.OrtValue.ortvalue_from_numpy(arr)
                io.bind_ortvalue_input(name, ov)
                io.bind_ortvalue_output("pr" + name[1], ov)
            io.bind_cpu_input("qkv", rng.random((b, 1, width), dtype=np.float32))
            io.bind_cpu_input("sl", np.full(b, past, np.int32))
            io.bind_cpu_input("tot", np.array(past + 1, np.int32))
            io.bind_cpu_input("cos", rng.random((ctx, half), dtype=np.float32))
            io.bind_cpu_input("sin", rng.random((ctx, half), dtype=np.float32))
            io.bind_output("out")
            t[b] = cpu_us(lambda: sess.run_with_iobinding(io))
        yield {"figure": "gqa", "past": past, "heads": heads, "kv_heads": kv, "cpu_us": {str(b): round(x, 1) for b, x in t.items()},
               "b8_over_b1": round(t[8] / t[1], 2), "per_step": sum(1 for n in graph.node if n.op_type == "GroupQueryAttention")}


def ort_decode_step(sess, b: int, past: int, rng):
    """Fill the ONNX Runtime session with b sequences of `past` random tokens; returns one decode
    step of all b that first cuts each back to `past` (so it can be timed again and again)."""
    for s in list(sess._slot):
        sess.release(s)
    for s in range(b):
        sess.add_sequence(s)
        sess.prefill(s, rng.integers(0, 1000, past))
    ids = rng.integers(0, 1000, b)

    def step():
        for s in range(b):
            sess.truncate(s, past)
        sess.decode(list(range(b)), ids)
    return step


def whole_step(bundle, threads: int, pasts: list[int]):
    from edge.runtime.ort_session import OrtDecoderSession

    sess = OrtDecoderSession(bundle, max_batch=8, threads=threads, max_context=2048, spin=False)
    rng = np.random.default_rng(0)
    for past in pasts:
        t = {b: cpu_us(ort_decode_step(sess, b, past, rng), n=10) for b in (1, 8)}
        yield {"figure": "decode_step", "past": past, "cpu_ms": {str(b): round(x / 1e3, 2) for b, x in t.items()},
               "scaling_bound_8_over_1": round(8 * t[1] / t[8], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", required=True, help="generator bundle folder (ONNX Runtime graph)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", default="64,256", help="past lengths for attention and the whole step")
    ap.add_argument("--alternatives", action="store_true",
                    help="also time other ORT kernels for the same weights (8-bit MatMulNBits, int8 QGEMM, fp32) at M = 1..32")
    args = ap.parse_args()
    import onnx

    from edge.bundle import Bundle

    bundle = Bundle.open(args.engine, kind="generator", verify=False)
    graph = onnx.load(str(bundle.file("model.ort.onnx")), load_external_data=False).graph
    pasts = [int(p) for p in args.past.split(",")]
    parts = [matmulnbits(graph, args.threads), attention(graph, args.threads, pasts), whole_step(bundle, args.threads, pasts)]
    if args.alternatives:
        parts.insert(1, alternatives(graph, args.threads))
    for part in parts:
        for rec in part:
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
