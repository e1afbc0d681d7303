"""Multi-step recipes above training (see the README's layout): resumable steps that call training and inference with
dataclasses in process; a step launched on several processes gets its config as a file (a run config YAML, the
workers' JSON arguments) in a process of its own.

* :mod:`.steps`: run a step atomically into its directory and record the config it was made from;
* :mod:`.critical`: the critical-token pipeline of cDPO (``tokenweave critical``);
* :mod:`.workers`: its sampling and scoring in the processes of ``accelerate launch``;
* :mod:`.localization`: its evidence: localization against the task's first errors (``tokenweave localize``) and
  cDPO's rollout test, each against chance;
* :mod:`.quickstart`: that pipeline on SmolLM2 with its evidence, then five accuracies (``tokenweave quickstart``).
"""
