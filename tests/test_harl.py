"""HARL on real MetaSchedule: through ms.tune_tasks, through the tuning stage, valid edits,
reproducible decisions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harl import builders, compilation, sampling
from harl import edits as E
from harlflow import rl
from harlflow.core.errors import BadInputError
from harlflow.core.signature import TensorSpec
from harlflow.core.targets import resolve_target
from tasks.importing import to_relax


def _matmul_onnx(path, n=64):
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((n, n)).astype("float32"), "w"
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "mm",
        [x],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [n, n])],
        [w],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def matmul(tmp_path_factory):
    path = _matmul_onnx(tmp_path_factory.mktemp("mm") / "mm.onnx")
    mod = compilation.prepare(to_relax(path, [TensorSpec("x", (64, 64), "float32")]))
    target = resolve_target("cpu")
    task = next(t for t in compilation.extract_tasks(mod, target) if "matmul" in t.task_name)
    return mod, target, task


def _context(task, target, strategy):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from harl._fast_import import import_tensor_intrinsics

    import_tensor_intrinsics()
    return ms.TuneContext(
        mod=task.dispatched[0],
        target=tvm.target.Target(target),
        space_generator="post-order-apply",
        search_strategy=strategy,
        task_name=task.task_name,
        rand_state=1,
        num_threads=1,
    )


def _ready(task, target, exploration, cost_model=None):
    """A HARL strategy (seed 0, the run's seed set) after ``pre_tuning`` on ``task`` with an
    empty database and ``cost_model`` (MetaSchedule's random model by default)."""
    from tvm.s_tir import meta_schedule as ms

    from harl.search_strategy import HARLSearchStrategy

    rl.setup(0)
    strategy = HARLSearchStrategy(seed=0, exploration=exploration)
    ctx = _context(task, target, strategy)
    spaces = ctx.space_generator.generate_design_space(ctx.mod)
    model = cost_model or ms.cost_model.RandomModel()
    strategy.pre_tuning(8, 4, spaces, ms.database.MemoryDatabase(), model)
    return strategy


@pytest.mark.slow
def test_harl_through_ms_tune_tasks(matmul, tmp_path):
    from tvm.s_tir import meta_schedule as ms

    from harl.search_strategy import HARLSearchStrategy
    from harl.task_scheduler import HARLTaskScheduler

    _, target, task = matmul
    ctx = _context(task, target, HARLSearchStrategy(seed=0))
    db = ms.database.MemoryDatabase()
    ms.tune_tasks(
        tasks=[ctx],
        task_weights=[1.0],
        work_dir=str(tmp_path),
        max_trials_global=12,
        num_trials_per_iter=4,
        builder=builders.default_builder(),
        database=db,
        task_scheduler=HARLTaskScheduler(seed=0),
    )
    records = db.get_all_tuning_records()
    assert 4 <= len(records) <= 12
    assert sum(1 for r in records if r.run_secs and float(r.run_secs[0]) < 1) >= 4  # real runs


@pytest.mark.slow
def test_harl_through_the_tuning_stage_saves_its_agent(tmp_path):
    from harl.spec import TuningSpec
    from tasks.importing import import_model
    from tasks.tuning import tune_model

    m = import_model("harlflow.examples:tiny_mlp", cache_dir=tmp_path / "cache")
    agent = tmp_path / "agent.pt"
    res = tune_model(
        m,
        resolve_target("cpu"),
        database_dir=tmp_path / "db",
        spec=TuningSpec(12, strategy="harl", min_trials_per_task=2, agent_path=agent),
        log=lambda *_: None,
    )
    assert res.strategy == "harl" and res.trials >= 8
    assert all(t.schedule == "tuned" for t in res.tasks)
    assert agent.is_file() and res.agent_metrics and "losses/policy" in res.agent_metrics[-1]
    # with XGBoost's rewards the run started fresh, not from the shipped pre-trained agent
    from harl.agent import PRETRAINED, EditAgent

    assert EditAgent.load(agent).updates < EditAgent.load(PRETRAINED).updates


def test_edits_give_valid_schedules(matmul):
    import tvm

    _, target, task = matmul
    ctx = _context(task, target, "replay-trace")
    postprocs = list(ctx.space_generator.postprocs)
    mod = task.dispatched[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype("float32")
    valid = 0
    for sch in sampling.sample_schedules(task, target, 3, seed=0):
        trace = sch.trace
        legal = E.legal_edits(trace)
        assert legal, "a matmul sketch has tile decisions to edit"
        for edit in [
            legal[i] for i in rng.choice(len(legal), size=min(6, len(legal)), replace=False)
        ]:
            new = E.apply_edit(mod, trace, edit, postprocs, seed=1)
            if new is None:
                continue
            valid += 1
            assert E.new_decision(trace, edit) == _decision(new.trace, edit.inst, trace)
            f = tvm.compile(new.mod, target=tvm.target.Target(target))
            dev = tvm.cpu()
            wv = rng.standard_normal((64, 64)).astype("float32")
            args = [tvm.runtime.tensor(v, dev) for v in (x, wv, np.zeros((64, 64), "float32"))]
            f(*args)
            np.testing.assert_allclose(args[2].numpy(), np.maximum(x @ wv, 0), rtol=1e-4, atol=1e-4)
    assert valid >= 6


def _decision(trace, position: int, like):
    kinds = [i.kind.name for i in like.insts]
    inst = trace.insts[position]
    assert inst.kind.name == kinds[position]
    d = trace.decisions[inst]
    return [int(v) for v in d] if inst.kind.name == E.TILE else int(d)


def test_same_seed_same_decisions(matmul):
    from tvm.s_tir import meta_schedule as ms

    from harl.search_strategy import HARLSearchStrategy

    _, target, task = matmul

    def first_round(seed: int) -> list[str]:
        rl.setup(seed)  # the run's seed: the agent's initial weights
        ctx = _context(task, target, HARLSearchStrategy(seed=seed))
        spaces = ctx.space_generator.generate_design_space(ctx.mod)
        ctx.search_strategy.pre_tuning(
            16, 4, spaces, ms.database.MemoryDatabase(), ms.cost_model.RandomModel(seed=seed)
        )
        cands = ctx.search_strategy.generate_measure_candidates()
        return [str(c.sch.trace) for c in cands]

    a, b, c = first_round(0), first_round(0), first_round(1)
    assert len(a) == 4 and a == b and a != c


@pytest.mark.slow
def test_harl_accepts_a_round_the_budget_cut_short(tmp_path):
    """Several searched tasks share one allowance: a task's round can be cut to the trials that
    are left, and HARL then hears back about a prefix of what it proposed (this crashed on
    ViT's tasks at 64 trials)."""
    from harl import tuning
    from tasks import datasets

    path, specs = datasets.suite(["ops_bmm"])[0].build(tmp_path)
    mod = compilation.prepare(to_relax(path, specs))
    target = {**resolve_target("cpu"), "num-cores": 1}  # the host's CPU: its code must run here
    res = tuning.tune(
        mod, target, tmp_path / "db", trials=21, min_trials_per_task=0, strategy="harl", seed=0
    )
    assert res.trials == 21  # the budget, exactly: the last round was cut
    assert sum(t.schedule == "tuned" for t in res.tasks) >= 2


def test_every_walk_ends_and_none_bootstraps_from_its_own_value(matmul):
    """A walk ends when it stops improving, when its steps run out (its state carries
    step / steps) or when nothing is left to edit; PPO gets each walk's next-state value as
    X-RLflow's agent does, which for an ended walk is 0. (The old update bootstrapped a walk that
    ran out of edits from its own last state's value.)"""
    from harl.search_strategy import ExplorationConfig

    _, target, task = matmul
    walks = ExplorationConfig(trajectories=4, steps=3, patience=100, random_starts=8)
    strategy = _ready(task, target, walks)
    _, buffer = strategy._explore()
    trajectories, last_values = buffer.trajectories, buffer.last_values
    assert trajectories and len(last_values) == len(trajectories)
    assert all(len(t) == 3 and t[-1].done and not any(s.done for s in t[:-1]) for t in trajectories)
    assert last_values == [0.0] * len(trajectories)


def test_the_pool_holds_one_edit_neighbours_of_the_best_measured(matmul):
    """Besides its walks, a round scores random one-edit neighbours of the best measured
    schedules (a larger pool near the best, cut by the cost model): each differs from its
    parent in exactly one decision and none was measured before."""
    from harl import edits as E
    from harl.search_strategy import ExplorationConfig

    _, target, task = matmul
    cfg = ExplorationConfig(trajectories=2, steps=1, random_starts=4, neighbours=12)
    strategy = _ready(task, target, cfg)
    without, _ = strategy._explore()  # nothing measured yet: no neighbours
    parent = strategy._sample(0).trace
    strategy.best = [(1e-3, parent)]
    strategy.measured.add(strategy._hash(strategy._replay(parent)))
    pool, _ = strategy._explore()
    before = {i: str(d) for i, _, d in E.decisions(parent)}

    def changed(sch) -> int:
        after = {i: str(d) for i, _, d in E.decisions(sch.trace)}
        return sum(after.get(i) != d for i, d in before.items())

    one_edit = [h for h, (_, _, sch) in pool.items() if changed(sch) == 1]
    assert len(one_edit) >= 4  # most of the 12 draws (some repeat, some are invalid)
    assert len(pool) > len(without)
    assert not strategy.measured & set(one_edit)


def test_task_bandit_spends_the_time_left_where_the_gain_per_second_is():
    import time

    from harl.budget import Deadline
    from harl.task_scheduler import TaskBandit

    # three equal-weight tasks, 10 s left of a 100 s budget
    late = Deadline(100.0, start=time.monotonic() - 90.0)
    bandit = TaskBandit([1.0, 1.0, 1.0], deadline=late, c=0.5)
    assert 0 < bandit.exploration() < 0.5 * 0.11  # a tenth of the budget left: little exploring
    assert [bandit.choose([0, 1, 2]) for _ in range(3)] == [0, 1, 2]  # one round each first
    bandit.learn(0, [2e-3], trials=8, seconds=4.0)
    bandit.learn(1, [2e-3], trials=8, seconds=30.0)  # its rounds take longer than what is left
    bandit.learn(2, [2e-3], trials=8, seconds=4.0)
    # second rounds: task 0 gains 1 ms in 4 s, task 2 the same in 8 s
    bandit.learn(0, [1e-3], trials=8, seconds=4.0)
    bandit.learn(2, [1e-3], trials=8, seconds=8.0)
    assert bandit.choose([0, 1, 2]) == 0  # the most gain per second; task 1 does not fit
    assert bandit.choose([1]) == 1  # nothing else alive: the slow task gets the time
    assert bandit.rewards[0][-1] > bandit.rewards[2][-1] > 0


def test_task_bandit_ends_a_converged_task_and_explores_fully_without_a_deadline():
    from harl.task_scheduler import TaskBandit

    bandit = TaskBandit([1.0, 3.0], patience=2, c=0.5)
    assert bandit.exploration() == 0.5
    bandit.choose([0, 1])
    assert not bandit.learn(0, [1e-3], trials=4, seconds=1.0)  # its first measurement
    assert not bandit.learn(0, [1e-3], trials=4, seconds=1.0)
    assert bandit.learn(0, [1.5e-3], trials=4, seconds=1.0)  # two rounds without a gain
    assert bandit.choose([0, 1]) == 1  # not measured yet
    bandit.learn(1, [], trials=4, seconds=1.0)  # every trial failed: no measurement, no gain
    assert bandit.best[1] == float("inf") and bandit.rewards[1] == [0.0]


@pytest.mark.slow
def test_each_search_runs_with_the_other_task_scheduler(tmp_path):
    from harl.spec import TuningSpec
    from harl.strategies import create_strategy
    from tasks.importing import import_model
    from tasks.tuning import tune_model

    swapped = create_strategy("harl", task_scheduler="gradient")  # HARL's search, MS's tasks
    assert (swapped.name, swapped.task_scheduler) == ("harl/gradient", "gradient")
    # MetaSchedule's search with HARL's task level, under a deadline
    m = import_model("harlflow.examples:tiny_mlp", cache_dir=tmp_path / "cache")
    spec = TuningSpec(16, 120.0, min_trials_per_task=2, task_scheduler="harl")
    res = tune_model(m, resolve_target("cpu"), database_dir=tmp_path / "db", spec=spec,
                     log=lambda *_: None)  # fmt: skip
    assert res.strategy == "evolutionary/harl"
    assert res.trials > 2 * len(res.tasks)  # the search measured beyond the warm-up
    assert all(t.schedule == "tuned" for t in res.tasks)
    with pytest.raises(BadInputError, match="--task-scheduler 'greedy'"):
        TuningSpec(16, task_scheduler="greedy")


def test_the_agent_sees_the_same_rewards_from_a_rescaled_cost_model(matmul):
    """HARL's rewards are in units of the cost model's score spread (ScoreScale): a model whose
    scores are 1000× another's plus 5 (as XGBoost's and the attention model's differ) gives
    the agent the same walks and the same rewards."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    from harl.search_strategy import ExplorationConfig, ScoreScale

    @derived_object
    class Rescaled(ms.cost_model.PyCostModel):
        def __init__(self, inner, a, b):
            self.inner, self.a, self.b = inner, a, b

        def predict(self, context, candidates):
            return self.a * np.asarray(self.inner.predict(context, candidates)) + self.b

    _, target, task = matmul

    def rewards(a: float, b: float) -> list[float]:
        walks = ExplorationConfig(trajectories=4, steps=3, random_starts=8)
        strategy = _ready(task, target, walks, Rescaled(ms.cost_model.RandomModel(seed=3), a, b))
        _, buffer = strategy._explore()
        return [s.reward for t in buffer.trajectories for s in t]

    plain, scaled = rewards(1.0, 0.0), rewards(1000.0, 5.0)
    assert plain and len(plain) == len(scaled)
    assert np.allclose(plain, scaled, atol=1e-6)
    assert any(abs(r) > 1e-3 for r in plain)  # the walks did score differences
    s = ScoreScale()
    s.update([1.0, 3.0])
    assert (s.mean, s.std, s.z(3.0), s.gain(3.0, 1.0)) == (2.0, 1.0, 1.0, 2.0)
