"""Data: the offline tasks, loading any dataset for a run, and preference pairs from sampled trajectories."""
