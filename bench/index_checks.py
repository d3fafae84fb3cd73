"""What the compiled-in index checks cost: a GPT-style decoder (token ids in, vocabulary 512,
64 tokens) built with and without them from the same tuning records, timed in alternating fresh
processes.

    python bench/index_checks.py [--trials 64] [--measure-seconds 30]
                                 [--out bench/results/index_checks.json]

Tunes the decoder once (``--trials``, evolutionary search, an empty database), packages it
(checks on: what every artifact now gets), compiles the same prepared module without the checks
from the same records into a copy of the artifact, and then times both side by side
(``harlflow.measure``: fresh processes, alternating rounds, blocks of new processes) for
``--measure-seconds``. Prints the ratio checked / unchecked with its 95 % interval and the check
kernels' rows of the kernel table (``harlflow.measure profile``); writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harlflow.core.targets import resolve_target  # noqa: E402
from harlflow.measure import Runtime, side_by_side  # noqa: E402
from tasks.packaging import export_library, measure_threads, run_worker  # noqa: E402


def decoder(path: Path, vocab: int = 512, seq: int = 64, hidden: int = 128, layers: int = 2):
    """A GPT-style decoder: token and position embeddings, causal self-attention and GELU MLP
    blocks (pre-norm), a tied LM head; exported to ONNX with int64 token ids [1, seq]."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.attn = nn.MultiheadAttention(hidden, 4, batch_first=True)
            self.mlp = nn.Sequential(
                nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)
            )
            mask = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
            self.register_buffer("mask", mask)

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, attn_mask=self.mask, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(seq, hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln = nn.LayerNorm(hidden)

        def forward(self, ids):
            x = self.wte(ids) + self.wpe(torch.arange(seq))
            for b in self.blocks:
                x = b(x)
            return self.ln(x) @ self.wte.weight.T

    ids = torch.zeros((1, seq), dtype=torch.int64)
    torch.onnx.export(
        Decoder().eval(), (ids,), str(path), input_names=["ids"], output_names=["logits"],
        opset_version=17, dynamo=False,
    )  # fmt: skip
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--measure-seconds", type=float, default=30.0)
    p.add_argument("--out", default="bench/results/index_checks.json")
    a = p.parse_args()

    from harl import compilation, database
    from harl.spec import TuningSpec
    from tasks.importing import import_model, to_relax
    from tasks.packaging import package
    from tasks.tuning import tune_model

    target = resolve_target("cpu")
    work = Path(tempfile.mkdtemp(prefix="bench-index-checks-"))
    m = import_model(str(decoder(work / "decoder.onnx")), cache_dir=work / "cache")
    tuned = tune_model(
        m, target, database_dir=work / "db", spec=TuningSpec(a.trials, min_trials_per_task=1),
        log=print,
    )  # fmt: skip
    art = package(
        m, target, database_dir=work / "db", home=work / "home",
        tune_summary=tuned.summary(), measure=False, log=print,
    )  # fmt: skip
    checked = Path(art.directory)
    unchecked = work / "unchecked"
    shutil.copytree(checked, unchecked)
    mod = compilation.prepare(to_relax(m.onnx_path, m.inputs), index_checks=False)
    db, _ = compilation.compile_database(
        database.open_database(work / "db"), compilation.extract_tasks(mod, target), target, 0
    )
    export_library(compilation.compile_module(mod, target, db), unchecked / "model.so")
    ref = str(checked / "reference.npz")
    for d in (checked, unchecked):  # both answer the reference inputs alike
        report = run_worker(["verify", "--path", str(d), "--reference", ref])
        assert all(r["within_tolerance"] for r in report.values()), report

    sbs = side_by_side(
        [Runtime("checked", "tvm", str(checked)), Runtime("unchecked", "tvm", str(unchecked))],
        ref, threads=measure_threads(target), max_seconds=a.measure_seconds, stop=None, log=print,
    )  # fmt: skip
    ratio = sbs.ratio("checked", "unchecked")
    profile = run_worker(["profile", "--path", str(checked), "--reference", ref])
    rows = [k for k in profile["kernels"] if "index_check" in k["kernel"]]
    result = {
        "model": "GPT-style decoder, vocabulary 512, 64 tokens, hidden 128, 2 layers",
        "trials": a.trials,
        "checks": json.loads((checked / "manifest.json").read_text())["index_checks"],
        **sbs.to_dict(),
        "ratio": ratio.value,
        "ratio_ci": list(ratio.ci),
        "check_kernels": rows,
        "profile_run_ms": profile["run_ms"],
    }
    print(f"\n{'':12s}{'median ms':>12s}{'95% interval':>22s}")
    for k in ("checked", "unchecked"):
        e = sbs.estimate(k)
        print(f"{k:12s}{e.median_ms:12.4f}{e.ci_ms[0]:12.4f} - {e.ci_ms[1]:.4f}")
    print(f"ratio checked/unchecked: {ratio.value:.4f} (95% interval {ratio.ci[0]:.4f}-"
          f"{ratio.ci[1]:.4f}; {sbs.blocks} blocks, {len(sbs.rounds)} rounds)")  # fmt: skip
    for k in rows:
        print(f"kernel table: {k['kernel']}: {k['calls']} call(s), {k['total_us']} µs per "
              f"inference, {100 * k['share']:.2f}% of the kernels' time")  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
