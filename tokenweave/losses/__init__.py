"""Pure loss functions: tensors in, tensors out. No TRL, no model, no config object.

Every function documents its formula and the paper it comes from. Shapes: per-token quantities are
``[B, T]`` over completion positions, with a ``[B, T]`` 0/1 mask.
"""
