"""X-RLflow: graph rewriting by reinforcement learning over verified substitutions.

:mod:`.ir` (the rewritable graph), :mod:`.rules` (the substitutions), :mod:`.cost` (cost
oracles), :mod:`.env` (the rewrite environment), :mod:`.agent` (GNN + PPO), :mod:`.search`
(greedy, backtracking and agent-driven search) and :mod:`.verify` (outputs against onnxruntime).
"""
