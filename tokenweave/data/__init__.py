"""Data: the offline tasks (and where an arithmetic trajectory first goes wrong), loading any dataset for a run, preference pairs and SFT sets chosen from labelled
trajectories, and per-token columns aligned to the completion tokens DPOTrainer sees."""
