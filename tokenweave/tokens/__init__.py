"""Per-token signals: critical-token scores, entropy signal, rank spans, excess loss.

Batched tensor code, no Python loops over tokens.
"""
