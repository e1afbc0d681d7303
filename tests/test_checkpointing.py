"""``follow_trl_checkpointing_kwargs``: TRL 1.16's reentrant guard for PEFT under ZeRO-3 writes to
``gradient_checkpointing_kwargs``, a name transformers 5 resolves once and then no longer reads. The 2-process run
with the guard in effect is ``tests/distributed/test_checkpointing.py``."""

from tokenweave.trainers.checkpointing import follow_trl_checkpointing_kwargs
from tokenweave.trainers.sft import TokenSFTConfig


def _config(tmp_path, **kwargs) -> TokenSFTConfig:
    return TokenSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                          activation_checkpointing=True, **kwargs)


def _trl_forces_reentrant(args) -> None:
    """What TRL's SFT, DPO and GRPO trainers do in ``__init__`` for PEFT under ZeRO-3 with checkpointing on."""
    args.gradient_checkpointing_kwargs = args.gradient_checkpointing_kwargs or {}
    args.gradient_checkpointing_kwargs["use_reentrant"] = True


def test_trls_write_reaches_what_transformers_reads(tmp_path):
    args = _config(tmp_path)
    _trl_forces_reentrant(args)
    assert args.activation_checkpointing_kwargs is None  # the bug: TRL's value is lost
    follow_trl_checkpointing_kwargs(args)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": True}


def test_a_users_kwargs_are_kept_and_forced_reentrant_as_trl_does(tmp_path):
    args = _config(tmp_path, activation_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
    _trl_forces_reentrant(args)
    follow_trl_checkpointing_kwargs(args)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": True, "preserve_rng_state": False}


def test_nothing_changes_where_trl_wrote_nothing(tmp_path):
    args = _config(tmp_path, activation_checkpointing_kwargs={"use_reentrant": False})
    follow_trl_checkpointing_kwargs(args)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    plain = _config(tmp_path)
    follow_trl_checkpointing_kwargs(plain)
    assert plain.activation_checkpointing_kwargs is None
