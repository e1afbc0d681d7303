"""Inference, no training: the layer between the trainers and a run (see the README's layout).

* :mod:`.generation`: batched generation from chat prompts (``generate_completions``), each prompt read once for its
  samples (``generate_with_shared_prefix``);
* :mod:`.sampling`: labelled trajectories of a task (``sample_trajectories``, ``tokenweave sample``);
* :mod:`.scoring`: critical-token scores from a positive and a negative model (``score_dataset``);
* :mod:`.rollout`: continuations of trajectory prefixes with a token forbidden (cDPO's rollout test);
* :mod:`.evaluate`: greedy accuracy on a task's test split (``evaluate_model``, ``tokenweave eval``);
* :mod:`.shards`: sampling and scoring split over the processes of ``accelerate launch`` (the same results whatever
  their number); :mod:`.vllm_sampling`: sampling with vLLM's offline engine.

* :mod:`.loading`: models (and LoRA adapters merged into their base) loaded for all of the above
  (``load_model_and_tokenizer``), and a LoRA adapter merged and saved as a model (``save_merged_model``).
"""
