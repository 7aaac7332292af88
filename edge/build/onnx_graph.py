"""A small ONNX graph helper: hierarchical node names and deduplicated named constants.

    g = Graph("decoder", opset=21, ms_opset=1)
    x = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    with g.scope("model/layers.3/attn"):
        y = g.op("MatMul", [x, w], name="q_proj/MatMul")   # node "/model/layers.3/attn/q_proj/MatMul"
    one = g.const(np.array([1], np.int64))                  # shared by every user of [1]

Node and output names follow onnxruntime-genai's convention (`/model/layers.3/attn/q_proj/MatMul`,
output `.../MatMul/output_0`) so that profiles and error messages point at a layer by name.
Constants are keyed by dtype, shape and bytes: `[1]` used 200 times is one initializer.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class Graph:
    """Collects nodes, initializers, inputs and outputs; `to_model()` assembles the ModelProto."""

    def __init__(self, name: str, *, opset: int = 21, ms_opset: int | None = None):
        self.name = name
        self.opset = opset
        self.ms_opset = ms_opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._scope: list[str] = []
        self._const_names: dict[str, str] = {}
        self._names: set[str] = set()
        self.initializer_bytes = 0
        self.stored: dict = {}  # bundle tensor name -> edge.bundle.StoredTensor: shared as external data
        self._stored_names: dict[tuple, str] = {}

    # ---- naming --------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, part: str) -> Iterator[None]:
        """Nest node names: with g.scope("model/layers.0"): ... -> "/model/layers.0/..."."""
        self._scope.append(part.strip("/"))
        try:
            yield
        finally:
            self._scope.pop()

    def _full(self, name: str) -> str:
        full = "/" + "/".join([*self._scope, name.strip("/")])
        base, i = full, 1
        while full in self._names:  # same op twice in one scope: MatMul, MatMul_1, ...
            full = f"{base}_{i}"
            i += 1
        self._names.add(full)
        return full

    def param(self, suffix: str) -> str:
        """An initializer name under the current scope: /model/layers.0/attn/qkv_proj -> model.layers.0.attn.qkv_proj.<suffix>."""
        return ".".join([p.replace("/", ".") for p in self._scope] + [suffix])

    # ---- graph I/O -------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        """Expose `value` as graph output `name` (an Identity when the names differ)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=self._full(f"{name}/Identity")))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    # ---- initializers --------------------------------------------------------------------
    def weight(self, name: str, array: np.ndarray) -> str:
        """A named (not deduplicated) initializer, e.g. `model.layers.0.attn.qkv_proj.MatMul.weight`."""
        t = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.initializers.append(t)
        self.initializer_bytes += array.nbytes
        return name

    def external(self, tensor: str, elem_type: int, dims: Sequence[int], name: str | None = None) -> str | None:
        """An initializer whose bytes are bundle tensor `tensor` in the weights file (ONNX external
        data: location, offset, length), viewed as `elem_type` [dims]; None when not stored.
        The graph then holds no copy: ops on it (Cast, Concat, Transpose...) are constant-folded
        by ONNX Runtime when the session loads."""
        st = self.stored.get(tensor)
        if st is None:
            return None
        itemsize = {TensorProto.UINT8: 1, TensorProto.INT8: 1, TensorProto.FLOAT16: 2, TensorProto.FLOAT: 4}[elem_type]
        if int(np.prod(dims)) * itemsize != st.nbytes:
            raise ValueError(f"{tensor}: {st.nbytes} stored bytes are not {elem_type} {list(dims)}")
        key = (tensor, elem_type, tuple(dims))
        if key not in self._stored_names:
            t = onnx.TensorProto()
            t.name = name or f"{tensor}.{'x'.join(map(str, dims))}"
            t.data_type = elem_type
            t.dims.extend(dims)
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", st.location), ("offset", str(st.offset)), ("length", str(st.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self.initializers.append(t)
            self._stored_names[key] = t.name
        return self._stored_names[key]

    def weight_int4(self, name: str, values: np.ndarray) -> str:
        """An INT4 initializer from int8 values in [-8, 7], packed two per byte (low nibble first,
        row-major over the flattened tensor, as ONNX stores INT4 raw_data)."""
        flat = (values.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
        t = onnx.TensorProto()
        t.name = name
        t.data_type = TensorProto.INT4
        t.dims.extend(values.shape)
        t.raw_data = raw.tobytes()
        self.initializers.append(t)
        self.initializer_bytes += raw.nbytes
        return name

    def const(self, value: np.ndarray | Sequence | float | int, dtype=None) -> str:
        """A deduplicated constant named by value: `/const/int64/[1]` or `/const/float32/<hash>`."""
        arr = np.asarray(value, dtype=dtype)
        key = f"{arr.dtype}|{arr.shape}|{hashlib.sha1(arr.tobytes()).hexdigest()}"
        if key not in self._const_names:
            if arr.size <= 4:
                shown = np.array2string(arr, separator=",").replace(" ", "")
            else:
                shown = f"{'x'.join(map(str, arr.shape))}_{hashlib.sha1(arr.tobytes()).hexdigest()[:8]}"
            name = f"/const/{arr.dtype}/{shown}"
            self._const_names[key] = name
            self.weight(name, arr)
        return self._const_names[key]

    # ---- nodes ---------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], *, name: str | None = None, n_out: int = 1, domain: str = "", unused: Sequence[int] = (), **attrs) -> str | list[str]:
        """Add one node; returns its output name (or list of names when n_out > 1).

        Outputs are named "<node name>/output_<i>"; indices in `unused` are left unnamed (optional
        outputs the op then skips). Empty-string inputs mark omitted optional inputs.
        """
        node_name = self._full(name or op_type)
        outs = ["" if i in unused else f"{node_name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def ms(self, op_type: str, inputs: Sequence[str], **kw) -> str | list[str]:
        """A com.microsoft contrib op."""
        return self.op(op_type, inputs, domain=MS_DOMAIN, **kw)

    # ---- assembly -------------------------------------------------------------------------
    def to_model(self, *, producer: str = "edge-rag", ir_version: int = 10) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.ms_opset is not None:
            opsets.append(helper.make_opsetid(MS_DOMAIN, self.ms_opset))
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        model.ir_version = ir_version
        return model


def save_model(model: onnx.ModelProto, path, *, initializer_bytes: int, external_threshold: int = 1_900_000_000) -> None:
    """Save `model`; weights go to `<name>.data` only when the protobuf would pass 2 GB."""
    from pathlib import Path

    path = Path(path)
    if initializer_bytes > external_threshold:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


__all__ = ["Graph", "MS_DOMAIN", "TensorProto", "save_model"]
