"""Per-token signals: critical-token scores, entropy signal, rank spans, excess loss.

Batched tensor code, no Python loops over tokens; no models, no trainers, no transformers (the logits processor that
applies HAPO's adaptive temperature in ``generate`` is ``trainers.hapo``'s).
"""
