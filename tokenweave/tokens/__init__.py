"""Per-token signals: critical-token scores, entropy signal, rank spans, excess loss; the random-signal control
(:mod:`.controls`) and how well a signal localizes a known token (:mod:`.localization`).

Batched tensor code, no Python loops over tokens; no models, no trainers, no transformers (the logits processor that
applies HAPO's adaptive temperature in ``generate`` is ``trainers.hapo``'s).
"""
