"""Pure loss functions: tensors in, tensors out. No TRL, no model, no trainer state.

Every function documents its formula and the paper it comes from. Shapes: per-token quantities are
``[B, T]`` over completion positions, with a ``[B, T]`` 0/1 mask. A loss's hyperparameters arrive as
plain arguments or as a small frozen dataclass (``PolicyLossConfig``).

- :mod:`.preference`: token-weighted DPO (cDPO), TDPO1/TDPO2 and the sequential KL they need.
- :mod:`.policy`: the policy-loss registry for RL (GRPO, DAPO, CISPO, GSPO, HAPO) and its aggregation.
"""
