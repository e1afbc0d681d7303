"""Token signals: what a method adds around a TRL trainer besides its loss, one interface for SFT, DPO and GRPO.

A method's per-token signal (HAPO's entropy signal, Rank-GRPO's spans, attention-derived credit, cDPO's critical-token
weights, a user's weight column, ...) is a :class:`TokenSignal` registered by name (``@register_token_signal("name")``)
and picked in YAML (``token_signals: [name, ...]``, or ``package.module:Class``). Each trainer hosts the signals of its
config (:class:`~tokenweave.trainers.host.SignalHostMixin`); a signal says what it needs and gives, and the host does
the rest. What a signal declares (class attributes and class methods: they are read from the config, before the
trainer exists)::

    declaration                   meaning
    supports                      the trainers it runs in, of "sft", "dpo", "grpo"; listed for another one, it is
                                  refused by name when the config is made (before any model loads)
    provides                      the loss inputs it returns from token_inputs ("token_weights" multiplies the
                                  per-token loss in every trainer; SFT also adds "token_loss", a per-token term;
                                  others are keyword inputs of the registered loss)
    weighs_tokens, selection      its token weights are what the random control moves (signal_control: shuffle);
                                  selection: they select tokens ranked by its "token_scores" (signal_control: inverse)
    columns(args)                 the per-token dataset columns it reads (SFT, DPO): batch key -> dataset column
                                  names (SFT: one; DPO: the chosen and the rejected column)
    check_dataset(dataset, args,  the rows' values checked when the dataset is loaded, before any model
     dataset_name)
    frozen_models(args)           the frozen models it reads ("reference", "history", or a teacher's name)
    needs_hidden_states           SFT, DPO: it reads TokenBatch.hidden (final hidden states and LM heads, for math over
                                  the whole vocabulary, a chunk of positions at a time: EAFT, ASFT)
    window_columns                SFT: the batch keys its prepare_window adds (Rho-1's global_batch selection)
    metric_prefixes, paper,       what `tokenweave plot`, run_info.json and the model card show of it
    option_prefixes,
    named_by_losses

and its hooks, every one optional::

    hook                                   called                                    kinds  returns
    implied(args), configure(args)         the config's __post_init__, for a signal   all   implied: on without being
     (class methods)                       that supports its trainer (configure:            listed; configure: checks
                                           only if it is on)                                its fields, False: nothing
                                                                                            to do (dropped)
    init_context(args) (class method)      around TRL's __init__                      all   a context manager (HAPO:
                                                                                            vLLM's logits processor)
    prepare_dataset(dataset, tokenizer,    after TRL's tokenisation (class method)    SFT,  the dataset, with its
     args, dataset_name)                                                              DPO   columns (one value per
                                                                                            completion token)
    needs_generation_entropies(training),  TRL's generation step                      GRPO  rollout.py documents them
     sample(generate, training),
     after_generation(generation)
    prepare_window(window)                 training, before an optimizer step's first  SFT   nothing: it hands each
                                           micro-batch, with all of them (a signal             micro-batch per-token
                                           with window_columns)                                values (StepWindow)
    token_inputs(batch)                    each micro-batch, before the loss          all   the loss inputs it
                                                                                            provides, per token
    state_dict() / load_state_dict()       each checkpoint / resume                   all   what a resume needs

``token_inputs`` gets one :class:`TokenBatch` whatever the trainer: per-token ``[R, T]`` tensors aligned with ``mask``
(DPO's rows are ``[chosen; rejected]``, shifted to the predicted tokens; SFT's the label tokens, one row per example
even in a padding-free batch; GRPO's the completion tokens), the signal's dataset columns aligned the same way, and the
frozen models' log-probs, computed when first asked for. Signals run in order (the implied ones first); their
``token_weights`` multiply (0 outside ``mask``), and a NaN or infinity in what a signal returns (at the tokens of the
loss) stops the run naming it (``trainers.host``, the rule of ``trainers.finite``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from ..checks import ConfigError
from ..registry import Paper, lookup

if TYPE_CHECKING:
    from .frozen import FrozenForwards, HiddenStates
    from .rollout import Generation

TRAINER_KINDS = ("sft", "dpo", "grpo")
SIGNAL_CONTROLS = ("none", "shuffle", "inverse", "full")
FROZEN_MODEL_NAMES = ("reference", "history")
"""The frozen models every trainer knows by name (``trainers.frozen``); teachers are named by
``teacher_model_paths``."""


@dataclass(frozen=True)
class TokenBatch:
    """One micro-batch as every signal sees it, in every trainer: ``[R, T]`` tensors whose positions are the tokens
    the loss is about (``mask``)."""

    kind: str
    """The trainer: "sft", "dpo" or "grpo"."""
    logps: torch.Tensor
    """log π_θ of each token (with gradient)."""
    mask: torch.Tensor
    """1 at the tokens that enter the loss, 0 elsewhere."""
    entropies: torch.Tensor | None
    """Token entropies of π_θ (no gradient)."""
    old_logps: torch.Tensor | None
    """GRPO: log π_old (TRL's ``old_per_token_logps``, or ``logps`` detached on-policy); None elsewhere."""
    columns: Mapping[str, torch.Tensor]
    """Per-token columns aligned with ``mask``: SFT and DPO, the signals' dataset columns (by batch key); GRPO, the
    generation batch's ``[B, T]`` entries (the columns signals added after generation among them)."""
    frozen: FrozenForwards
    """``frozen.logps(name)``: the frozen model's log-probs of the same tokens ``[R, T]``, computed when first asked
    for (every process must ask for the same names: under ZeRO-3 a forward is a collective)."""
    training: bool
    sees_generation_batch: bool = False
    """GRPO: :func:`~tokenweave.trainers.rollout.loss_sees_generation_batch`."""
    row_keys: torch.Tensor | None = field(default=None, repr=False)
    """``[R, k]`` integers that identify each row for the random control's seeds (the host's)."""
    inputs: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    """SFT: the model inputs of the batch (``input_ids``, ``attention_mask``; ``[R, L]``, a padded batch's rows: the
    ``[R, T]`` tensors are about its tokens 1 .. L−1), for a signal that runs a model over it itself (ssToken's
    attention)."""
    hidden: HiddenStates | None = field(default=None, repr=False)
    """SFT and DPO, for a signal that ``needs_hidden_states``: the final hidden states and LM heads of the policy and of the
    frozen models at the batch's positions (:class:`~tokenweave.trainers.frozen.HiddenStates`), for math over the
    whole next-token distribution, a chunk of positions at a time."""


class StepWindow(Protocol):
    """SFT: the micro-batches of one optimizer step on this process, as :meth:`TokenSignal.prepare_window` sees
    them (``trainers.sft``)."""

    def token_batches(self) -> list[TokenBatch]:
        """Each micro-batch as a :class:`TokenBatch`, from a forward of the policy without gradient (computed once,
        shared by the signals)."""

    def set_column(self, index: int, key: str, values: torch.Tensor) -> None:
        """Give micro-batch ``index`` per-token ``values`` ``[R, T]`` (aligned with its ``TokenBatch.mask``), which
        its ``TokenBatch.columns[key]`` will hold in the loss."""


class SignalTrainer(Protocol):
    """What a signal may use of its trainer: the config, the accelerator, TRL's state and metrics
    (``_metrics[mode][name].append(float)``), and the host's random control."""

    args: Any
    accelerator: Any
    state: Any
    model: Any
    _metrics: dict

    def signal_control(self, weights: torch.Tensor, mask: torch.Tensor, row_keys: torch.Tensor,
                       scores: torch.Tensor | None = None) -> torch.Tensor: ...


class TokenSignal:
    """A token signal (module docstring). Every hook is optional: the defaults do nothing.

    Built once per trainer, after TRL's ``__init__``, as ``cls(trainer)``; ``self.trainer`` is a
    :class:`SignalTrainer`.
    """

    name: ClassVar[str]
    supports: ClassVar[frozenset[str]] = frozenset({"grpo"})
    provides: ClassVar[frozenset[str]] = frozenset()
    weighs_tokens: ClassVar[bool] = False
    selection: ClassVar[bool] = False
    metric_prefixes: ClassVar[tuple[str, ...]] = ()
    option_prefixes: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[Paper | None] = None
    needs_hidden_states: ClassVar[bool] = False
    """SFT, DPO: ``token_inputs`` reads ``batch.hidden`` (the policy's final hidden states are then kept from its
    forward)."""
    window_columns: ClassVar[tuple[str, ...]] = ()
    """SFT: the batch keys :meth:`prepare_window` adds to the micro-batches (read back from ``batch.columns``)."""
    named_by_losses: ClassVar[frozenset[str]] = frozenset()
    """Losses whose name names this signal too (the model card calls ``loss_type: cdpo`` "cdpo", not
    "cdpo+critical_tokens"; a signal named like its loss, as hapo, is folded anyway)."""

    def __init__(self, trainer: SignalTrainer):
        self.trainer = trainer

    # -- declarations and configuration (from the config alone) ---------------------------------------------------

    @classmethod
    def implied(cls, args) -> bool:
        """Whether another field turns this signal on without it being listed (``policy_loss: hapo`` implies hapo)."""
        return False

    @classmethod
    def configure(cls, args) -> bool:
        """Resolve and check this signal's fields (it is on); False: it has nothing to do and is dropped."""
        return True

    @classmethod
    def columns(cls, args) -> dict[str, tuple[str, ...]]:
        """The per-token dataset columns it reads: batch key -> dataset column names, one per completion of an
        example (SFT: one, aligned to the label tokens; DPO: the chosen and the rejected one)."""
        return {}

    @classmethod
    def check_dataset(cls, dataset, args, dataset_name: str) -> None:
        """Check a loaded dataset's rows for this signal (value ranges, a task's settings), before any model loads
        (``tokenweave.train``); a ``ValueError`` names the dataset, row and column."""

    @classmethod
    def frozen_models(cls, args) -> tuple[str, ...]:
        """The frozen models ``token_inputs`` reads (``batch.frozen.logps(name)``)."""
        return ()

    @classmethod
    def init_context(cls, args):
        """A context manager around TRL's ``__init__`` (where TRL builds what a signal must change, as vLLM's
        engine)."""
        return nullcontext()

    @classmethod
    def prepare_dataset(cls, dataset, tokenizer, args, dataset_name: str):
        """The tokenised dataset with this signal's :meth:`columns` (SFT and DPO; the host checks their lengths)."""
        return dataset

    # -- GRPO's rollout hooks (trainers.rollout) -------------------------------------------------------------------

    def needs_generation_entropies(self, training: bool) -> bool:
        """Whether ``after_generation`` will call ``generation.old_policy_entropies()`` (then TRL's old-log-prob
        forward, when it runs one, also computes the entropies, and no extra forward is needed)."""
        return False

    def sample(self, generate: Callable[[], Any], training: bool) -> Any:
        """TRL's ``_generate_single_turn``: ``generate()`` returns ``(completion_ids, logprobs)``."""
        return generate()

    def after_generation(self, generation: Generation) -> dict[str, torch.Tensor]:
        """Per-token columns to add to (or replace in) the generation batch ("advantages" replaces TRL's)."""
        return {}

    # -- the loss phase, in every trainer ------------------------------------------------------------------------

    def prepare_window(self, window: StepWindow) -> None:
        """SFT, training: called with all the micro-batches of one optimizer step on this process (TRL's gradient
        accumulation window), before the first one's forward, on every process; a signal that selects over the
        whole step (Rho-1's ``global_batch`` scope) scores them here (``window.token_batches()``) and hands each
        micro-batch per-token values (``window.set_column``, under one of its :attr:`window_columns`)."""

    def token_inputs(self, batch: TokenBatch) -> dict[str, Any]:
        """The loss inputs this signal provides for this micro-batch: ``token_weights`` ``[R, T]`` multiplies the
        per-token loss; a selection also returns ``token_scores`` ``[R, T]``, its ranking; SFT also takes
        ``token_loss`` ``[R, T]``, a per-token term added to the weighted loss (with gradient; ASFT's KL)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State that a resumed run needs (saved with each checkpoint; tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


TOKEN_SIGNALS: dict[str, type[TokenSignal]] = {}


def register_token_signal(name: str) -> Callable[[type[TokenSignal]], type[TokenSignal]]:
    """Class decorator: register a :class:`TokenSignal` under ``name`` (a name can be taken only once)."""

    def decorator(cls: type[TokenSignal]) -> type[TokenSignal]:
        if TOKEN_SIGNALS.get(name, cls) is not cls:
            raise ValueError(f"a token signal is already registered as {name!r}")
        unknown = set(cls.supports) - set(TRAINER_KINDS)
        if unknown:
            raise ValueError(f"token signal {name!r} supports unknown trainers {sorted(unknown)}; "
                             f"expected some of {TRAINER_KINDS}")
        cls.name = name
        TOKEN_SIGNALS[name] = cls
        return cls

    return decorator


def get_token_signal(name: str) -> type[TokenSignal]:
    """The token signal registered as ``name``, or ``package.module:Class`` (the module is imported, which registers
    a decorated class; an undecorated one is registered under this name)."""
    signal = lookup(name, TOKEN_SIGNALS, "token signal", lambda found: isinstance(found, type) and issubclass(
        found, TokenSignal), "TokenSignal subclass")
    if TOKEN_SIGNALS.get(getattr(signal, "name", None)) is not signal:
        register_token_signal(name)(signal)
    return signal


@dataclass
class TokenSignalConfig:
    """The token-signal fields of the three trainers' configs (a mixin; :func:`resolve_token_signals` runs in their
    ``__post_init__``)."""

    token_signals: list[str] | None = field(
        default=None,
        metadata={
            "help": "Token signals (tokenweave.trainers.signals) to run, in order, by registered name (hapo, "
            "rank_grpo, attention_credit, critical_tokens, weights, weight_rules, or any registered with "
            "@register_token_signal) or 'package.module:Class'. A signal implied by other fields is added first "
            "(policy_loss: hapo implies hapo, loss_type: cdpo critical_tokens); one with nothing to do is dropped; "
            "one that does not support this trainer is refused."
        },
    )
    signal_control: str = field(
        default="none",
        metadata={
            "help": "The random-signal control, on the token weights of every signal that weighs tokens: 'shuffle' "
            "puts each sequence's own weights on a random permutation of its tokens (matched random: the same "
            "weights, on tokens chosen by chance); 'inverse', for a selection, selects the same number of tokens "
            "of each sequence from the other end of the signal's ranking; 'full', the full-token baseline: every "
            "weight 1 (the signals still run: their other loss terms, metrics and cost stay). 'none': the signals "
            "as they are.",
            "choices": list(SIGNAL_CONTROLS),
        },
    )
    signal_control_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the control's permutations (None: `seed`); each row's is derived from it and the "
                  "row's identity (SFT, DPO: its dataset row; GRPO: the generation step and its row), so it does "
                  "not depend on batch order, process count or resumption."},
    )


def active_signal_classes(args) -> list[type[TokenSignal]]:
    """The classes of the signals that are on in a resolved config (none for a config without token signals)."""
    return [get_token_signal(name) for name in getattr(args, "token_signals", None) or []]


def resolve_token_signals(args) -> None:
    """Turn on the config's signals (``args.token_signals`` becomes the signals that are on, in the order they run)
    and check what they need, before anything loads. Only signals that support the config's trainer
    (``args.trainer_kind``) are asked whether they are implied, and only those that are on are configured."""
    kind = args.trainer_kind
    requested = [get_token_signal(name).name for name in args.token_signals or []]  # names every signal
    unsupported = [name for name in requested if kind not in TOKEN_SIGNALS[name].supports]
    if unsupported:
        details = ", ".join(f"{name!r} ({'/'.join(sorted(TOKEN_SIGNALS[name].supports))})" for name in unsupported)
        raise ConfigError(f"token_signals: {details} do(es) not support the {kind} trainer.")
    on = [name for name, signal in TOKEN_SIGNALS.items()
          if kind in signal.supports and (name in requested or signal.implied(args)) and signal.configure(args)]
    args.token_signals = [name for name in on if name not in requested] + [name for name in requested if name in on]
    signals = active_signal_classes(args)
    if args.signal_control != "none":
        weighing = [signal for signal in signals if signal.weighs_tokens]
        if not weighing:
            on = f"none of {args.token_signals} does" if args.token_signals else "no token signal is on"
            raise ConfigError(f"signal_control {args.signal_control!r} moves token weights: it needs a token signal "
                              f"that weighs tokens, and {on}.")
        if args.signal_control == "inverse" and not all(signal.selection for signal in weighing):
            raise ConfigError("signal_control 'inverse' takes the other end of a selection's ranking: "
                              f"{[signal.name for signal in weighing if not signal.selection]} select(s) no tokens.")
    known = FROZEN_MODEL_NAMES + tuple(getattr(args, "teacher_model_paths", None) or {})
    for signal in signals:
        missing = [name for name in signal.frozen_models(args) if name not in known]
        if missing:
            raise ConfigError(f"token signal {signal.name!r} reads the frozen model(s) {missing}: name them in "
                              f"teacher_model_paths (known: {list(known)}).")


@contextmanager
def signals_init_context(args) -> Iterator[None]:
    """The ``init_context`` of every signal that is on, nested in order (around TRL's ``__init__``)."""
    with ExitStack() as stack:
        for signal in active_signal_classes(args):
            stack.enter_context(signal.init_context(args))
        yield
