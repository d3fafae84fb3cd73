"""HARL: hierarchical adaptive RL auto-scheduler on TVM MetaSchedule."""
