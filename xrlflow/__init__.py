"""X-RLflow: RL graph rewriting (GNN + PPO over verified substitutions). Not built yet: see issue 4."""
