"""Pure loss functions: tensors in, tensors out. No TRL, no model, no trainer state.

Every function documents its formula and the paper it comes from. Shapes: per-token quantities are
``[B, T]`` over completion positions, with a ``[B, T]`` 0/1 mask. A loss's hyperparameters arrive as
plain arguments or as a small frozen dataclass (``PreferenceLossConfig``, ``PolicyLossConfig``).

Both families are registries (a method is one registered function plus its config fields):

- :mod:`.preference`: the preference-loss registry (``register_preference_loss``/``get_preference_loss``):
  cDPO (token-weighted DPO) and TDPO1/TDPO2, on ``TokenPairs`` plus the inputs each names in ``needs``
  (per-token weights, the sequential KL), and the sequential KL itself.
- :mod:`.policy`: the policy-loss registry for RL (GRPO, DAPO, CISPO, GSPO, HAPO) and its aggregation.
"""
