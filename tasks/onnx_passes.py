"""ONNX clean-ups the import applies to models as other tools export them, before TVM sees them.

- **Constant folding** (:func:`fold_constants`): weights computed by constant subgraphs
  (``ConstantOfShape``, ``Constant`` → ``Cast``, ``Shape`` → ``Gather`` chains on static shapes)
  become initializers, as onnxruntime's constant folding makes them, so tuning sees constant
  weights and prepacks them, and the same architecture exported either way gives the same
  kernels.
- **Inference form** (:func:`inference_form`): ``Dropout`` (with or without its ratio input) and
  ``Identity`` chains removed, the unused training outputs of ``BatchNormalization`` dropped,
  dead nodes and unused initializers removed; ``Mish`` written as ``x * tanh(Softplus(x))``,
  since TVM's own lowering of it is off by up to 1e-3 relative for negative inputs.

Both keep every graph output's name and value; the import checks the result again.
"""

from __future__ import annotations

import numpy as np

from xrlflow import ir

# never folded: their outputs are not functions of their inputs
_RANDOM = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}
FOLD_LIMIT = 1 << 26
"""elements: a folded tensor larger than this (256 MB of float32) stays a computation"""


def _static_shapes(graph) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if all(d is not None for d in dims):
                shapes[vi.name] = tuple(dims)
    return shapes


def _evaluate(node, values: list, opsets) -> list:
    """One node's outputs on constant inputs, by ONNX's reference implementation."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    feeds = {n: v for n, v in zip(node.input, values, strict=True) if n}
    graph = helper.make_graph(
        [node],
        "fold",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for n, v in feeds.items()
        ],
        [helper.make_tensor_value_info(o, 0, None) for o in node.output if o],
    )
    model = helper.make_model(graph, opset_imports=list(opsets))
    return ReferenceEvaluator(model).run(None, feeds)


def fold_constants(model):
    """``model`` with every node whose inputs are all constants (or, for ``Shape`` and
    ``Size``, whose input shape is static) replaced by an initializer holding its value."""
    from onnx import numpy_helper

    g = model.graph
    outputs = {o.name for o in g.output}
    known = {i.name: i for i in g.initializer}
    cache: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = numpy_helper.to_array(known[name])
        return cache[name]

    shapes = _static_shapes(g)
    kept, folded = [], 0
    for node in g.node:
        results = None
        if node.op_type in _RANDOM or node.domain not in ("", "ai.onnx"):
            pass
        elif any(a.type in (5, 10) for a in node.attribute):  # GRAPH, GRAPHS: control flow
            pass
        elif node.op_type in ("Shape", "Size") and node.input[0] in shapes:
            shape = np.array(shapes[node.input[0]], dtype=np.int64)
            if node.op_type == "Size":
                results = [np.array(int(np.prod(shape)), dtype=np.int64)]
            else:
                attrs = {a.name: a.i for a in node.attribute}
                results = [shape[attrs.get("start", 0) : attrs.get("end", len(shape))]]
        elif all(not n or n in known for n in node.input):
            try:
                results = _evaluate(
                    node, [value(n) if n else None for n in node.input], model.opset_import
                )
            except Exception:  # an operator the reference cannot run: keep it for TVM
                results = None
        if results is None or any(np.asarray(r).size > FOLD_LIMIT for r in results):
            kept.append(node)
            continue
        folded += 1
        for name, r in zip(node.output, results, strict=False):
            if name:
                arr = np.asarray(r)
                cache[name] = arr
                known[name] = numpy_helper.from_array(arr, name)
    if not folded:
        return model, 0
    del g.node[:]
    g.node.extend(kept)
    used = {n for node in kept for n in node.input} | outputs
    del g.initializer[:]
    g.initializer.extend(t for name, t in known.items() if name in used)
    return model, folded


def inference_form(model):
    """``model`` without training leftovers, identity chains, dead nodes or unused initializers
    (see the module's docstring); the count of nodes removed."""
    g = model.graph
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    kept = []
    before = len(g.node)
    consumed = {n for node in g.node for n in node.input}
    for node in g.node:
        for i, n in enumerate(node.input):
            node.input[i] = rename.get(n, n)
        mask_used = (
            node.op_type == "Dropout"
            and len(node.output) > 1
            and (node.output[1] in consumed or node.output[1] in outputs)
        )
        training = node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]
        if node.op_type == "Identity" or (
            node.op_type == "Dropout" and not mask_used and not training
        ):
            if node.output[0] not in outputs:
                rename[node.output[0]] = node.input[0]
                continue
        if node.op_type == "Mish":  # TVM's log(1 + exp(x)) loses what Softplus keeps
            from onnx import helper

            sp, th = f"{node.output[0]}__softplus", f"{node.output[0]}__tanh"
            kept += [
                helper.make_node("Softplus", [node.input[0]], [sp]),
                helper.make_node("Tanh", [sp], [th]),
                helper.make_node("Mul", [node.input[0], th], [node.output[0]], name=node.name),
            ]
            continue
        if node.op_type == "BatchNormalization" and len(node.output) > 1:
            extra = [o for o in node.output[1:] if o in consumed or o in outputs]
            if not extra:
                del node.output[1:]
        kept.append(node)
    # dead nodes: walk back from the outputs
    live = ir.live(kept, outputs, lambda n: n.input, lambda n: n.output)
    needed = outputs | {n for node in live for n in node.input}
    del g.node[:]
    g.node.extend(live)
    removed = {t.name for t in g.initializer if t.name not in needed}
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    # IR <= 3 lists initializers as graph inputs too: drop the ones removed with them
    for i in [i for i in g.input if i.name in removed]:
        g.input.remove(i)
    return model, before - len(live)
