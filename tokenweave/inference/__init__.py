"""Inference, no training: the layer between the trainers and a run (see the README's layout).

* :mod:`.generation`: batched generation from chat prompts (``generate_completions``);
* :mod:`.sampling`: labelled trajectories of a task (``sample_trajectories``, ``tokenweave sample``);
* :mod:`.scoring`: critical-token scores from a positive and a negative model (``score_dataset``);
* :mod:`.evaluate`: greedy accuracy on a task's test split (``evaluate_model``, ``tokenweave eval``).

* :mod:`.loading`: models (and LoRA adapters on their base) loaded for all of the above (``load_model_and_tokenizer``).
"""
