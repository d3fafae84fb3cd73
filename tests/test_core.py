"""The core layer and the run settings: error lines, the one notion of "same target", and the
options checked before any store is touched."""

from __future__ import annotations

import pytest

from flows.settings import RunSettings
from harlflow.core.errors import BadInputError, first_line
from harlflow.core.targets import resolve_target, target_key


def test_first_line_of_any_exception():
    assert first_line(ValueError("shape mismatch\nmore detail")) == "shape mismatch"
    assert first_line(RuntimeError("Traceback (most recent call last):\n  File x\nboom: it")) == (
        "boom: it"
    )
    assert first_line(KeyError()) == "KeyError"  # an empty message: the type, never IndexError
    assert first_line(OSError("  \n ")) == "OSError"
    assert len(first_line(ValueError("x" * 1000))) == 300


def test_one_notion_of_the_same_target():
    import tvm

    from tasks.publishing import target_tag

    host = resolve_target("cpu")
    exported = dict(tvm.target.Target(host).export())  # what a database record carries
    assert target_key(exported) == target_key(host) == target_tag(host)
    assert target_key({**host, "num-cores": host["num-cores"] + 1}) != target_key(host)
    assert target_key({**host, "mattr": []}) == target_key(host)  # empty and absent are equal


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("strategy", "foo", "unknown strategy 'foo': choose one of evolutionary, harl"),
        ("rewrite", "magic", "unknown rewrite method 'magic'"),
        ("rewrite_oracle", "tensorrt", "unknown rewrite oracle 'tensorrt': choose one of tvm"),
        ("trials", -1, "--trials must be >= 0"),
        ("time_budget_s", 0.0, "more than 0 seconds"),
        ("min_trials_per_task", -2, "--min-trials-per-task must be >= 0"),
        ("s3_uri", "http://bucket", "not an S3 URI"),
        ("rpc", "nohost", "invalid --rpc"),
        ("target", '{"kind": "cuda"}', "unsupported --target kind 'cuda'"),
    ],
)
def test_run_settings_refuse_bad_values(field, value, message):
    with pytest.raises(BadInputError, match=message):
        RunSettings(**{field: value}).checked()


def test_run_settings_defaults():
    s = RunSettings().checked()
    assert s.trials == 64 and s.target == resolve_target("cpu")
    assert s.rewrite_oracle == "tvm"  # the artifact is compiled by TVM: judge rewrites there
    assert RunSettings(time_budget_s=60).checked().trials > 10_000  # the deadline decides
    with pytest.raises(BadInputError, match="--promote compares measured latencies"):
        RunSettings(promote=True, measure=False).checked()


def test_run_settings_check_the_cost_model_file(tmp_path):
    assert RunSettings(cost_model="xgb").checked().cost_model == "xgb"
    with pytest.raises(BadInputError, match="cost model file not found"):
        RunSettings(cost_model=str(tmp_path / "none.pt")).checked()
    (tmp_path / "bad.pt").write_text("no")
    with pytest.raises(BadInputError, match="is not a harlflow cost model"):
        RunSettings(cost_model=str(tmp_path / "bad.pt")).checked()
