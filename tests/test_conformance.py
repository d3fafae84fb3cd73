"""A fast subset of ONNX's own operator conformance cases through harlflow's import → prepare →
compile path (``bench/conformance.py`` runs all of them): each must pass or be refused up front
with a ModelImportError naming the operator; never a wrong result or a crash."""

from __future__ import annotations

from tasks import conformance

SUBSET = {
    # indexing: the bounds checks must keep ONNX's semantics, negatives included
    "test_gather_0": "passed",
    "test_gather_negative_indices": "passed",
    "test_gather_elements_negative_indices": "passed",
    "test_gathernd_example_int32_batch_dim1": "passed",
    "test_scatternd": "passed",
    "test_scatter_elements_with_negative_indices": "passed",  # an extern kernel under a root
    # what TVM computed wrongly before harlflow's own lowerings
    "test_mish": "passed",  # tanh near 0
    "test_attention_causal_boolmask_nan_robustness_expanded": "passed",  # max of -inf rows
    "test_clip_default_min": "passed",  # a 0-d input
    "test_dynamicquantizelinear_expanded": "passed",  # ConvertLayout's SIGFPE
    "test_group_normalization_example": "passed",  # no fallback schedule
    "test_shape_start_1": "passed",  # folded at import
    # refused up front, naming the operator
    "test_nonmaxsuppression_single_box": "refused",
    "test_layer_normalization_2d_axis0": "refused",  # TVM's Mean output is a scalar
    "test_bitshift_left_int32_shift_ge_width": "refused",
    "test_training_dropout": "refused",
    "test_resize_upsample_scales_linear": "refused",  # TVM's importer fails on it
}


def test_conformance_subset_passes_or_is_refused_naming_the_operator():
    results = {r["case"]: r for r in conformance.run_cases(list(SUBSET), workers=1)}
    outcomes = {name: r["outcome"] for name, r in results.items()}
    assert outcomes == SUBSET, {
        n: results[n].get("message") for n in SUBSET if outcomes[n] != SUBSET[n]
    }
    for r in results.values():
        if r["outcome"] == "refused":
            assert r["operator"] in r["message"], r
    table = conformance.summarize(list(results.values()))
    assert table["Gather"] == {"passed": 2, "pass_rate": 1.0}
