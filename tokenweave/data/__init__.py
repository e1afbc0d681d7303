"""Data: the offline tasks (and where an arithmetic trajectory first goes wrong), loading any dataset for a run, preference pairs and SFT sets chosen from labelled
trajectories, and per-token columns aligned to the completion tokens DPOTrainer sees."""

BUILTIN_TASKS = ("arithmetic", "recommendation", "gsm8k", "noisy_arithmetic")
"""The tasks ``dataset_name`` names without a path (:func:`tokenweave.data.loading.load_run_dataset`)."""
