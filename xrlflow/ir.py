"""The graph IR the rewrite rules work on: an ONNX graph as plain Python objects.

``from_onnx`` / ``to_onnx`` convert without loss (ops, domains, attributes, initializers, graph
inputs/outputs, value shapes, opsets, metadata). Graphs are immutable by convention: a rewrite
builds a new :class:`Graph` (``Graph.replace``) that shares the untouched nodes and arrays.

``check`` runs after every rewrite (like ``torch.fx.Graph.lint``): the graph is acyclic, every
tensor has exactly one producer, strict ONNX shape inference succeeds, and the graph outputs keep
their names, element types and shapes.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphError(ValueError):
    """A graph (or a rewrite's result) is malformed; the message names the problem."""


@dataclass(frozen=True)
class Node:
    """One operator: ``outputs = op(inputs, **attrs)``. Empty input names are omitted optionals."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    domain: str = ""


@dataclass(frozen=True)
class Value:
    """A typed tensor: ONNX element type and a shape (ints; strings for symbolic dims)."""

    name: str
    elem_type: int
    shape: tuple[int | str, ...] | None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))


@dataclass
class Graph:
    """A dataflow graph. ``nodes`` are kept in a topological order."""

    nodes: list[Node]
    inputs: list[Value]
    outputs: list[Value]
    initializers: dict[str, np.ndarray]
    values: dict[str, Value] = field(default_factory=dict)  # inferred types of inner tensors
    name: str = "graph"
    opsets: dict[str, int] = field(default_factory=lambda: {"": 17})
    ir_version: int = 8
    metadata: dict[str, str] = field(default_factory=dict)
    producer: tuple[str, str] = ("harlflow.xrlflow", "0.1")
    _ids: itertools.count = field(default_factory=lambda: itertools.count(), repr=False)

    # ------------------------------------------------------------------ lookups
    def producer_of(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs if o}

    def consumers_of(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def is_const(self, name: str) -> bool:
        return name in self.initializers

    def const(self, name: str) -> np.ndarray | None:
        return self.initializers.get(name)

    def shape(self, name: str) -> tuple[int | str, ...] | None:
        if name in self.initializers:
            return tuple(self.initializers[name].shape)
        v = self.values.get(name) or next((x for x in self.inputs if x.name == name), None)
        return v.shape if v else None

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        s = self.shape(name)
        return s if s is not None and all(isinstance(d, int) and d >= 0 for d in s) else None  # type: ignore[return-value]

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return _elem(self.initializers[name])
        v = self.values.get(name) or next((x for x in self.inputs if x.name == name), None)
        return v.elem_type if v else None

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def fresh(self, hint: str) -> str:
        """A tensor/node name not used in this graph."""
        used = self._used_names()
        while True:
            name = f"{hint}__x{next(self._ids)}"
            if name not in used:
                return name

    def _used_names(self) -> set[str]:
        names = set(self.initializers) | {v.name for v in self.inputs}
        for n in self.nodes:
            names.add(n.name)
            names.update(n.outputs)
        return names

    # ------------------------------------------------------------------ rewriting
    def replace(
        self,
        remove: list[Node],
        add: list[Node],
        inits: dict[str, np.ndarray] | None = None,
        rename: dict[str, str] | None = None,
    ) -> Graph:
        """A new graph without ``remove``, with ``add``, new initializers, and uses renamed.

        ``rename`` maps a tensor to the tensor that now carries its value (e.g. an eliminated
        identity's output → its input); graph outputs are kept by name with an Identity when
        their producer disappears. Unused initializers are dropped; nodes are re-sorted.
        """
        gone = {id(n) for n in remove}
        rename = dict(rename or {})
        add = list(add)
        out_names = set(self.output_names)
        produced_by_add = {o for n in add for o in n.outputs}
        keep: list[Node] = []
        producer = self.producer_of()
        uses = {i for n in self.nodes for i in n.inputs} | out_names
        for old, new in list(rename.items()):
            if old not in out_names:
                continue
            p = producer.get(old)
            p_free = p is not None and all(
                o == old or o in rename or o not in uses for o in p.outputs
            )
            if new in produced_by_add and new not in out_names and p_free:
                gone.add(id(p))
                # the new producer takes the graph output's name instead of an extra Identity
                del rename[old]
                add = [_rename_node(n, {new: old}, outputs=True) for n in add]
                rename = {k: (old if v == new else v) for k, v in rename.items()}
            else:
                keep.append(Node(self.fresh("keep_output"), "Identity", (new,), (old,)))

        def r(x: str) -> str:
            seen = 0
            while x in rename and seen < 64:
                x, seen = rename[x], seen + 1
            return x

        # new nodes take the place of the first node whose value they replace (stable order)
        at = min(
            (i for i, n in enumerate(self.nodes) if any(o in rename for o in n.outputs)),
            default=len(self.nodes),
        )
        nodes = [n for n in self.nodes[:at] if id(n) not in gone] + add
        nodes += [n for n in self.nodes[at:] if id(n) not in gone]
        nodes = [
            n
            if not any(i in rename for i in n.inputs)
            else Node(n.name, n.op, tuple(r(i) for i in n.inputs), n.outputs, n.attrs, n.domain)
            for n in nodes
        ]
        nodes += keep
        g = Graph(
            nodes,
            list(self.inputs),
            list(self.outputs),
            {},
            {},
            self.name,
            dict(self.opsets),
            self.ir_version,
            dict(self.metadata),
            self.producer,
            self._ids,
        )
        g.nodes = live(toposort(g), out_names)
        used = {i for n in g.nodes for i in n.inputs} | out_names
        g.initializers = {
            k: v for k, v in {**self.initializers, **(inits or {})}.items() if k in used
        }
        return g

    def infer(self) -> Graph:
        """This graph with ``values`` filled by strict ONNX shape inference."""
        # large constants travel as typed inputs: inference needs their types, not their bytes
        big = {k for k, a in self.initializers.items() if a.size > 64}
        light = Graph(
            self.nodes,
            self.inputs
            + [Value(k, _elem(self.initializers[k]), self.initializers[k].shape) for k in big],
            self.outputs,
            {k: a for k, a in self.initializers.items() if k not in big},
            {},
            self.name,
            self.opsets,
            self.ir_version,
        )
        try:
            model = onnx.shape_inference.infer_shapes(
                to_onnx(light, with_values=False), strict_mode=True, data_prop=True
            )
        except Exception as e:  # onnx raises several types (InferenceError, ValidationError, ...)
            raise GraphError(f"shape inference failed: {e}") from e
        self.values = {v.name: _value(v) for v in model.graph.value_info}
        for v in model.graph.output:
            self.values.setdefault(v.name, _value(v))
        return self

    # ------------------------------------------------------------------ identity
    def structural_hash(self) -> str:
        """Name-independent hash of the computation (ops, attributes, constants, wiring)."""
        cached = self.__dict__.get("_hash")
        if cached is not None and cached[0] == len(self.nodes):
            return cached[1]
        h = self._structural_hash()
        self.__dict__["_hash"] = (len(self.nodes), h)  # graphs are not edited after a rewrite
        return h

    def _structural_hash(self) -> str:
        memo: dict[str, str] = {}
        for i, v in enumerate(self.inputs):
            memo[v.name] = f"in{i}"
        for k, arr in self.initializers.items():
            memo[k] = _array_digest(arr)
        node_hashes = []
        for n in self.nodes:
            h = hashlib.sha1(
                repr(
                    (
                        n.domain,
                        n.op,
                        sorted((k, attr_key(v)) for k, v in n.attrs.items()),
                        [memo.get(i, i) for i in n.inputs],
                    )
                ).encode()
            ).hexdigest()
            node_hashes.append(h)
            for j, o in enumerate(n.outputs):
                if o:
                    memo[o] = f"{h}:{j}"
        # the node multiset too: two identical nodes (before CSE) differ from one (after)
        key = ([memo.get(o) for o in self.output_names], sorted(node_hashes))
        return hashlib.sha1(repr(key).encode()).hexdigest()

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts


_DIGESTS: dict[int, tuple[np.ndarray, str]] = {}


def _array_digest(arr: np.ndarray) -> str:
    hit = _DIGESTS.get(id(arr))
    if hit is not None and hit[0] is arr:
        return hit[1]
    d = hashlib.sha1(np.ascontiguousarray(arr).tobytes() + str((arr.dtype, arr.shape)).encode())
    digest = "c" + d.hexdigest()
    if len(_DIGESTS) > 100_000:
        _DIGESTS.clear()
    _DIGESTS[id(arr)] = (arr, digest)
    return digest


def attr_key(v: Any) -> Any:
    """An attribute value as a hashable, comparable key (arrays by their digest)."""
    if isinstance(v, np.ndarray):
        return _array_digest(v)
    if isinstance(v, onnx.TensorProto):
        return _array_digest(numpy_helper.to_array(v))
    if isinstance(v, onnx.GraphProto):
        return hashlib.sha1(v.SerializeToString()).hexdigest()
    if isinstance(v, list):
        return tuple(attr_key(x) for x in v)
    return v


def _elem(a: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(a.dtype)


def normalize(g: Graph) -> Graph:
    """Constant nodes become initializers (what every runtime does first); returns a new graph."""
    inits, rename, gone = {}, {}, []
    for n in g.nodes:
        v = n.attrs.get("value") if n.op == "Constant" and not n.domain else None
        if v is not None and n.outputs[0] not in g.output_names:
            name = g.fresh(n.outputs[0].replace("/", "_") or "const")
            inits[name] = (
                numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)
            )
            rename[n.outputs[0]] = name
            gone.append(n)
    return check(g.replace(gone, [], inits, rename), g.outputs) if gone else g


def _value(vi: onnx.ValueInfoProto) -> Value:
    t = vi.type.tensor_type
    shape = None
    if t.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim
        )
    return Value(vi.name, t.elem_type, shape)


def _value_info(v: Value) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(
        v.name, v.elem_type, list(v.shape) if v.shape is not None else None
    )


def _rename_node(n: Node, m: dict[str, str], outputs: bool = False) -> Node:
    return Node(
        n.name,
        n.op,
        tuple(m.get(i, i) for i in n.inputs),
        tuple(m.get(o, o) for o in n.outputs) if outputs else n.outputs,
        n.attrs,
        n.domain,
    )


def live(order: list, outputs: set[str], inputs_of=None, outputs_of=None) -> list:
    """Dead-code elimination: keep the nodes the graph outputs depend on (order kept). Nodes
    are ours (``.inputs``/``.outputs``) or, with ``inputs_of``/``outputs_of``, anything else
    (ONNX's NodeProto: ``lambda n: n.input``)."""
    inputs_of = inputs_of or (lambda n: n.inputs)
    outputs_of = outputs_of or (lambda n: n.outputs)
    needed = set(outputs)
    keep = []
    for n in reversed(order):
        if any(o in needed for o in outputs_of(n)):
            keep.append(n)
            needed.update(i for i in inputs_of(n) if i)
    return keep[::-1]


def toposort(g: Graph) -> list[Node]:
    """Nodes in a topological order (stable: keeps the given order where it is already valid)."""
    produced = {o: n for n in g.nodes for o in n.outputs if o}
    order: list[Node] = []
    state: dict[int, int] = {}  # 1 visiting, 2 done
    for root in g.nodes:
        stack = [(root, False)]
        while stack:
            n, expanded = stack.pop()
            if expanded:
                state[id(n)] = 2
                order.append(n)
                continue
            s = state.get(id(n))
            if s == 2:
                continue
            if s == 1:
                raise GraphError(f"cycle through node {n.name!r} ({n.op})")
            state[id(n)] = 1
            stack.append((n, True))
            for i in reversed(n.inputs):
                p = produced.get(i)
                if p is not None and state.get(id(p)) != 2:
                    if state.get(id(p)) == 1:
                        raise GraphError(f"cycle through node {p.name!r} ({p.op})")
                    stack.append((p, False))
    return order


def from_onnx(model: onnx.ModelProto) -> Graph:
    """Convert an ONNX model; nested graphs (If/Loop bodies) are kept as attributes, untouched."""
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for t in g.sparse_initializer:
        raise GraphError(f"sparse initializer {t.values.name!r} is not supported")
    nodes = []
    for i, n in enumerate(g.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        nodes.append(
            Node(
                n.name or f"{n.op_type}_{i}",
                n.op_type,
                tuple(n.input),
                tuple(n.output),
                attrs,
                n.domain,
            )
        )
    graph = Graph(
        nodes=nodes,
        inputs=[_value(v) for v in g.input if v.name not in inits],
        outputs=[_value(v) for v in g.output],
        initializers=inits,
        values={v.name: _value(v) for v in g.value_info},
        name=g.name or "graph",
        opsets={o.domain: o.version for o in model.opset_import},
        ir_version=model.ir_version,
        metadata={p.key: p.value for p in model.metadata_props},
        producer=(model.producer_name, model.producer_version),
    )
    graph.nodes = toposort(graph)
    return graph


_PROTOS: dict[int, tuple[Node, onnx.NodeProto]] = {}


def _node_proto(n: Node) -> onnx.NodeProto:
    """NodeProto of ``n`` (cached: nodes are immutable and shared between rewritten graphs)."""
    hit = _PROTOS.get(id(n))
    if hit is not None and hit[0] is n:
        return hit[1]
    node = helper.make_node(
        n.op, list(n.inputs), list(n.outputs), name=n.name, domain=n.domain or None
    )
    for k, v in n.attrs.items():
        node.attribute.append(
            helper.make_attribute(k, v)
            if not isinstance(v, np.ndarray)
            else helper.make_attribute(k, numpy_helper.from_array(v))
        )
    if len(_PROTOS) > 200_000:
        _PROTOS.clear()
    _PROTOS[id(n)] = (n, node)
    return node


def to_onnx(g: Graph, with_values: bool = True) -> onnx.ModelProto:
    """Convert back to an ONNX model (value_info included when ``with_values``)."""
    nodes = [_node_proto(n) for n in g.nodes]
    graph = helper.make_graph(
        nodes,
        g.name,
        [_value_info(v) for v in g.inputs],
        [_value_info(v) for v in g.outputs],
        [numpy_helper.from_array(np.asarray(a), k) for k, a in g.initializers.items()],
        value_info=[
            _value_info(v)
            for k, v in g.values.items()
            if with_values and k not in set(g.output_names)
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[_opset(d, v) for d, v in g.opsets.items()],
        producer_name=g.producer[0],
        producer_version=g.producer[1],
    )
    model.ir_version = g.ir_version
    for k, v in g.metadata.items():
        model.metadata_props.add(key=k, value=v)
    return model


def _opset(domain: str, version: int) -> onnx.OperatorSetIdProto:
    o = onnx.OperatorSetIdProto(version=version)
    if domain:  # the default domain stays unset, as exporters write it
        o.domain = domain
    return o


def check(g: Graph, reference_outputs: list[Value] | None = None) -> Graph:
    """Validate ``g`` (see module docstring); returns it with inferred ``values``."""
    producers: dict[str, str] = {}
    defined = set(g.initializers) | {v.name for v in g.inputs}
    for n in g.nodes:
        for o in n.outputs:
            if not o:
                continue
            if o in producers or o in defined:
                raise GraphError(f"tensor {o!r} has more than one producer (node {n.name!r})")
            producers[o] = n.name
    seen = set(defined)
    for n in g.nodes:
        for i in n.inputs:
            if i and i not in seen:
                raise GraphError(
                    f"node {n.name!r} ({n.op}) reads {i!r} before it is produced "
                    "(missing producer or a cycle)"
                )
        seen.update(o for o in n.outputs if o)
    for o in g.output_names:
        if o not in seen:
            raise GraphError(f"graph output {o!r} is not produced")
    g.infer()
    for ref in reference_outputs or []:
        got = g.values.get(ref.name)
        if got is None or got.elem_type != ref.elem_type or not _compatible(ref.shape, got.shape):
            raise GraphError(f"graph output {ref.name!r} changed: {ref} -> {got}")
    return g


def _compatible(a, b) -> bool:
    """Same rank and equal wherever both dims are known (a symbolic dim may become concrete)."""
    if a is None or b is None:
        return True
    return len(a) == len(b) and all(
        not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a, b, strict=True)
    )


def load(path) -> Graph:
    return from_onnx(onnx.load(str(path)))


def save(g: Graph, path) -> None:
    onnx.save(to_onnx(g), str(path))
