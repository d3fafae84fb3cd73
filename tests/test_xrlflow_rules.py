"""Every rewrite rule on a random instance of its pattern: it applies, the result passes the graph
check, and onnxruntime computes the same outputs as on the original; plus the IR round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from xrlflow import ir, rules
from xrlflow.verify import max_mismatch


@pytest.mark.parametrize("rule", rules.RULES, ids=lambda r: r.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_rule_preserves_outputs(rule: rules.Rule, seed: int):
    g = ir.check(ir.from_onnx(rule.example(np.random.default_rng(seed))))
    found = rules.candidates(g, [rule])
    assert found, f"{rule.name} did not match its own example"
    for cand in found:
        assert cand.graph.structural_hash() != g.structural_hash()
        assert cand.graph.output_names == g.output_names
        assert max_mismatch(g, cand.graph, seed=seed) is None, (rule.name, cand.node)


def test_library_covers_the_categories():
    cats = {r.category for r in rules.RULES}
    assert {"fold", "fuse", "merge", "enlarge", "algebra", "layout", "eliminate", "const"} <= cats
    assert len(rules.RULES) >= 30


def test_rewrite_that_breaks_shapes_is_rejected():
    """A rewrite whose result fails the check is never offered (here: a wrong-shaped weight)."""
    g = ir.check(ir.from_onnx(rules.RULES[0].example(np.random.default_rng(0))))
    m = rules.Match(g)
    conv = next(n for n in g.nodes if n.op == "Conv")
    bn = next(n for n in g.nodes if n.op == "BatchNormalization")
    bad_w, inits = m.init(np.zeros((5, 4, 2, 2), np.float32), "bad")
    node = m.new("Conv", (conv.inputs[0], bad_w), **conv.attrs)
    assert rules.apply(g, rules.Rewrite([node], {bn.outputs[0]: node.outputs[0]}, inits)) is None


@pytest.mark.parametrize("example", ["tiny_mlp", "small_cnn", "bert_encoder"])
def test_ir_round_trip_is_lossless(tmp_path, example):
    from tasks.importing import import_model

    imported = import_model(f"harlflow.examples:{example}", cache_dir=tmp_path)
    original = onnx.load(str(imported.onnx_path))
    g = ir.check(ir.from_onnx(original))
    back = ir.to_onnx(g)
    onnx.checker.check_model(back, full_check=True)
    assert [n.op_type for n in back.graph.node] == [n.op_type for n in original.graph.node]
    assert {t.name for t in back.graph.initializer} == {t.name for t in original.graph.initializer}
    for a, b in zip(original.graph.node, back.graph.node, strict=True):
        assert a.attribute == b.attribute and list(a.input) == list(b.input)
    assert back.opset_import == original.opset_import and back.ir_version == original.ir_version
    assert max_mismatch(g, ir.from_onnx(back), rtol=0, atol=0) is None


def test_every_rule_has_its_one_line_doc_and_the_cli_lists_them(capsys):
    from harlflow.cli import main

    for r in rules.RULES:
        assert r.doc and "\n" not in r.doc and len(r.doc) <= 100, r.name
    assert main(["rules"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = [line.split()[1] for line in out if line.split()[0].isdigit()]
    assert listed == [r.name for r in rules.RULES]  # the library's order, which agents record
    assert any(rules.RULES[5].doc in line for line in out)


def test_every_bundled_example_name_loads_a_model_that_declares_its_inputs():
    """The names the CLI offers (importable without PyTorch) each resolve to a factory whose
    model lists its inputs, as ``harlflow optimize harlflow.examples:NAME`` needs."""
    import sys

    from harlflow import examples

    assert "tiny_mlp" in examples.NAMES and set(examples.EXAMPLES) == set(examples.NAMES)
    for name in examples.NAMES:
        assert getattr(examples, name) is examples.EXAMPLES[name]
    assert examples.tiny_mlp().harlflow_inputs and "torch" in sys.modules
    with pytest.raises(AttributeError):
        examples.no_such_model  # noqa: B018 - the attribute access is the test


def test_a_bug_in_a_rule_is_an_error_not_a_non_match():
    def broken(m: rules.Match, n):
        yield from ()
        raise KeyError("perm")  # e.g. reading an attribute the node does not have

    def no_fit(m: rules.Match, n):
        yield from ()
        np.ones(3) + np.ones(4)  # shapes that do not broadcast: this instance does not fit

    base = rules.BY_NAME["relu_idempotent"]
    g = ir.check(ir.from_onnx(base.example(np.random.default_rng(0))))
    assert rules.candidates(g, [dataclasses.replace(base, rewrite=no_fit)]) == []
    with pytest.raises(rules.RuleError, match="rule 'relu_idempotent' failed at node .*KeyError"):
        rules.candidates(g, [dataclasses.replace(base, rewrite=broken)])
