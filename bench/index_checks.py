"""What the compiled-in index checks cost: a GPT-style decoder (token ids in, vocabulary 512,
64 tokens) built with and without them from the same tuning records, timed in alternating fresh
processes.

    python bench/index_checks.py [--trials 64] [--rounds 7] [--out bench/results/index_checks.json]

Tunes the decoder once (``--trials``, evolutionary search, an empty database), packages it
(checks on: what every artifact now gets), compiles the same prepared module without the checks
from the same records into a copy of the artifact, and then times both with ``python -m
harlflow.measure tvm`` (each a fresh process, warm-up then up to 200 calls), alternating A B A B
over ``--rounds``. Prints each round's medians and their ratio (checked / unchecked), and the
check kernels' rows of the kernel table (``harlflow.measure profile``); writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harlflow.core.targets import resolve_target  # noqa: E402
from tasks.packaging import export_library, run_worker  # noqa: E402


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
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default="bench/results/index_checks.json")
    a = p.parse_args()

    from harl import compilation, database
    from tasks.importing import import_model, to_relax
    from tasks.packaging import package
    from tasks.tuning import tune_model

    target = resolve_target("cpu")
    work = Path(tempfile.mkdtemp(prefix="bench-index-checks-"))
    m = import_model(str(decoder(work / "decoder.onnx")), cache_dir=work / "cache")
    tuned = tune_model(
        m, target, database_dir=work / "db", trials=a.trials, strategy="evolutionary",
        seed=0, min_trials_per_task=1, log=print,
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

    rounds = []
    for r in range(a.rounds):
        row = {}
        for name, d in (("checked", checked), ("unchecked", unchecked)):
            res = run_worker(["tvm", "--path", str(d), "--reference", ref, "--repeats", "200"])
            row[name] = res["median_ms"]
        row["ratio"] = row["checked"] / row["unchecked"]
        rounds.append(row)
        print(f"round {r + 1}: checked {row['checked']:.4f} ms, unchecked "
              f"{row['unchecked']:.4f} ms, ratio {row['ratio']:.4f}", flush=True)  # fmt: skip
    profile = run_worker(["profile", "--path", str(checked), "--reference", ref])
    rows = [k for k in profile["kernels"] if "index_check" in k["kernel"]]
    ratios = [r["ratio"] for r in rounds]
    result = {
        "model": "GPT-style decoder, vocabulary 512, 64 tokens, hidden 128, 2 layers",
        "trials": a.trials,
        "checks": json.loads((checked / "manifest.json").read_text())["index_checks"],
        "rounds": rounds,
        "median_checked_ms": statistics.median(r["checked"] for r in rounds),
        "median_unchecked_ms": statistics.median(r["unchecked"] for r in rounds),
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "check_kernels": rows,
        "profile_run_ms": profile["run_ms"],
    }
    print(f"\n{'':12s}{'median ms':>12s}")
    print(f"{'checked':12s}{result['median_checked_ms']:12.4f}")
    print(f"{'unchecked':12s}{result['median_unchecked_ms']:12.4f}")
    print(f"ratio checked/unchecked: median {result['ratio_median']:.4f}, per round "
          f"{min(ratios):.4f} to {max(ratios):.4f} over {a.rounds} rounds")  # fmt: skip
    for k in rows:
        print(f"kernel table: {k['kernel']}: {k['calls']} call(s), {k['total_us']} µs per "
              f"inference, {100 * k['share']:.2f}% of the kernels' time")  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
