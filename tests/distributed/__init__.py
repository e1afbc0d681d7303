"""Multi-process tests: 2-process CPU runs under DeepSpeed ZeRO-2/ZeRO-3 (``accelerate launch``) and torchrun probes.

``runs.py`` launches several training runs in one launch; ``saved_model_probe.py`` and ``grpo_invariance_probe.py``
are scripts the tests launch. All tests here are marked slow.
"""
