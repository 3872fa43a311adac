"""Whether a state decoded from a checkpoint fits the live object it is to be loaded into.

Checked before anything is loaded, for every kind of optimizer: torch's own
``load_state_dict`` checks little (a fused AdamW takes an ``exp_avg`` of 2 elements for a
512-element parameter and writes past it: heap corruption), and a wrapper (accelerate's
``AcceleratedOptimizer``) hid the optimizer's class from the checks that existed.

What is checked, and why that much:

- parameter groups: the same number, each the same number of parameters, ids ints and
  unique; every hyperparameter the live group has as a number is there, of its kind
  (``lr: "x"`` would raise mid-training), flags are bools;
- per-parameter state: known parameters only, a dict of str keys; ``step`` a finite,
  non-negative number or scalar tensor. For torch's element-wise optimizers (Adam,
  AdamW, SGD... whatever wraps them) every other state tensor has its parameter's
  exact shape, a floating dtype for a floating parameter, and the keys the optimizer
  steps with (Adam: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad). For
  any other optimizer (Adafactor, third-party) whose state need not be
  parameter-shaped: a tensor the live optimizer already holds under the same key must
  have its shape and dtype family, and no state tensor may hold more elements than
  its parameter unless the live optimizer holds one that large;
- a scheduler: its fields are the live scheduler's, each of the live value's kind
  (``last_epoch: "x"`` is refused), lists of the same length (``_last_lr``: one per
  parameter group), ``lr_lambdas`` entries only where the live ones have state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from safepoint.errors import IncompatibleCheckpointError

__all__ = ["check_fits", "unwrap_optimizer"]

No = Callable[[str], IncompatibleCheckpointError]


def unwrap_optimizer(value: Any) -> Any:
    """The optimizer inside wrappers (accelerate's ``AcceleratedOptimizer``, anything
    exposing an ``.optimizer`` that has ``param_groups``); ``value`` itself otherwise."""
    seen = 0
    while seen < 8:  # a wrapper of itself must not loop
        inner = getattr(value, "optimizer", None)
        if inner is None or inner is value or not hasattr(inner, "param_groups"):
            return value
        value, seen = inner, seen + 1
    return value


def _is_optimizer(value: Any) -> bool:
    return isinstance(value, torch.optim.Optimizer) or (
        hasattr(value, "param_groups") and hasattr(value, "state")
    )


def check_fits(key: str, value: Any, obj: Any, kind: str, *, where: str) -> None:
    """Raise ``IncompatibleCheckpointError`` unless ``obj`` (decoded from a checkpoint)
    can be loaded into the live ``value`` as a whole: loading it cannot fail half way,
    and a module or optimizer gets tensors of the shapes it has."""

    def no(problem: str) -> IncompatibleCheckpointError:
        return IncompatibleCheckpointError(
            f"{where}: cannot restore {key!r}: {problem}; is this checkpoint from the same "
            "model and optimizer configuration?"
        )

    stateful = callable(getattr(value, "load_state_dict", None))
    if kind == "value":
        if stateful:
            raise no(f"it was saved as a plain value, but the state holds a {type(value).__name__}")
        if isinstance(value, torch.Tensor) and not (
            isinstance(obj, torch.Tensor) and obj.shape == value.shape and obj.dtype == value.dtype
        ):
            found = (
                f"{obj.dtype} {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else "no tensor"
            )
            raise no(f"the checkpoint holds {found}, the state {value.dtype} {tuple(value.shape)}")
        return
    if not stateful:
        raise no(
            "it was saved from an object with state_dict(), the state holds a "
            + type(value).__name__
        )
    if not isinstance(obj, dict):
        raise no(f"its saved state is a {type(obj).__name__}, not a state dict")
    if isinstance(value, torch.nn.Module):
        _check_module(value, obj, no)
    elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):  # has .optimizer too
        _check_scheduler(value, obj, no)
    elif _is_optimizer(inner := unwrap_optimizer(value)):
        _check_optimizer(inner, obj, no)
    elif callable(check := getattr(value, "check_state_dict", None)):
        # Any object may check its own saved state before anything is loaded (the data
        # sampler: same data set size and seed); its IncompatibleCheckpointError says
        # what to do, as is.
        check(obj)


def _check_module(module: torch.nn.Module, obj: dict[Any, Any], no: No) -> None:
    live = module.state_dict()
    missing, unexpected = set(live) - set(obj), set(obj) - set(live)
    if missing or unexpected:
        raise no(
            f"keys missing {sorted(missing)[:3]}, unexpected {sorted(map(str, unexpected))[:3]}"
        )
    for name, t in live.items():
        saved = obj[name]
        if isinstance(t, torch.Tensor) and (
            not isinstance(saved, torch.Tensor) or saved.shape != t.shape
        ):
            found = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise no(f"{name} is {found} in the checkpoint, {tuple(t.shape)} in the model")


# torch.optim optimizers whose per-parameter state tensors all have the parameter's shape
# (Adafactor's factored moments do not, nor do many third-party optimizers'), with the
# state keys that are scalars, and those each step reads (the rest depend on flags).
_PARAM_SHAPED = frozenset(
    "SGD Adam AdamW Adamax NAdam RAdam RMSprop Adagrad Adadelta ASGD Rprop SparseAdam".split()  # noqa: SIM905
)
_SCALARS = frozenset({"step", "mu_product", "eta", "mu"})
_MAY_BE_NONE = frozenset({"momentum_buffer"})
_REQUIRED = {"Adam": ("exp_avg", "exp_avg_sq"), "AdamW": ("exp_avg", "exp_avg_sq")}


def _check_optimizer(opt: Any, obj: dict[Any, Any], no: No) -> None:
    groups, saved_state = obj.get("param_groups"), obj.get("state")
    if not isinstance(groups, list) or not isinstance(saved_state, dict):
        raise no("the optimizer state has no param_groups list or state dict")
    if len(groups) != len(opt.param_groups):
        raise no(f"{len(groups)} parameter groups saved, {len(opt.param_groups)} now")
    params: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
    for i, (saved, live) in enumerate(zip(groups, opt.param_groups, strict=True)):
        ids = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(ids, list) or len(ids) != len(live["params"]):
            raise no(f"parameter group {i} holds another number of parameters")
        _check_group(i, saved, live, no)
        for pid, p in zip(ids, live["params"], strict=True):
            if not _is_int(pid) or pid in params:
                raise no(f"parameter group {i} has a bad or repeated parameter id {pid!r}")
            params[pid] = (p, saved)
    cls = type(opt)
    known = cls.__module__.startswith("torch.optim") and cls.__name__ in _PARAM_SHAPED
    for pid, st in saved_state.items():
        if not _is_int(pid) or pid not in params or not isinstance(st, dict):
            raise no(f"state for an unknown parameter {pid!r}")
        param, group = params[pid]
        live_state = opt.state.get(param, {})
        if not all(isinstance(k, str) for k in st):
            raise no(f"the state of parameter {pid} has keys that are not names")
        if known and st:
            wanted = set(_REQUIRED.get(cls.__name__, ()))
            if cls.__name__ in _REQUIRED and group.get("amsgrad") is True:
                wanted.add("max_exp_avg_sq")
            if missing := sorted(wanted - set(st)):
                raise no(f"the state of parameter {pid} lacks {', '.join(missing)}")
        for k, t in st.items():
            _check_state_value(pid, k, t, param, live_state.get(k), known, no)


def _check_state_value(
    pid: int, k: str, t: Any, param: torch.Tensor, live: Any, known: bool, no: No
) -> None:
    what = f"state {k!r} of parameter {pid}"
    if k == "step":
        ok = (_is_number(t) and t >= 0) or (
            isinstance(t, torch.Tensor)
            and t.dim() == 0
            and not t.is_complex()
            and t.dtype != torch.bool
            and bool(torch.isfinite(t.double()) & (t.double() >= 0))
        )
        if not ok:
            raise no(f"{what} is not a step count ({_show(t)})")
        return
    if isinstance(live, torch.Tensor):  # what the live optimizer holds rules
        if not isinstance(t, torch.Tensor) or t.shape != live.shape or _family(t) != _family(live):
            raise no(f"{what} is {_show(t)}, the optimizer holds {_show(live)}")
        return
    if not isinstance(t, torch.Tensor):
        # torch's own optimizers store None only for SGD's momentum_buffer (momentum=0);
        # any other None reaches the step's kernels (fused Adam: a TypeError mid-run)
        if known and k not in _SCALARS and (t is not None or k not in _MAY_BE_NONE):
            raise no(f"{what} is {_show(t)}, not a tensor")
        return
    if known and k in _SCALARS:
        if t.numel() != 1 or _family(t) not in ("float", "int"):
            raise no(f"{what} is {_show(t)}, not a scalar")
    elif known:
        if t.shape != param.shape or _family(t) != _family(param):
            raise no(f"{what} is {_show(t)}, the parameter {_show(param)}")
    elif t.numel() > param.numel():
        # Another optimizer's state may be shaped otherwise (Adafactor's factored
        # moments); state larger than its parameter is refused: a checkpoint of
        # Shampoo-like optimizers resumes once the live one holds state (above).
        raise no(f"{what} is {_show(t)}, larger than the parameter {_show(param)}")


def _check_group(i: int, saved: dict[str, Any], live: dict[str, Any], no: No) -> None:
    for k, v in live.items():
        if k in ("params", "param_names"):
            continue
        if k not in saved:
            # torch fills missing flags from its defaults (__setstate__); never numbers
            if _is_number(v) or isinstance(v, (tuple, list)):
                raise no(f"parameter group {i} has no {k}")
            continue
        if not _same_kind(v, saved[k]):
            raise no(f"parameter group {i}: {k} is {_show(saved[k])}, expected like {v!r}")
    for k, v in saved.items():
        if k not in live and not (v is None or isinstance(v, (bool, int, float, str))):
            raise no(f"parameter group {i} has an unknown setting {k!r}")


def _check_scheduler(sched: Any, obj: dict[Any, Any], no: No) -> None:
    live = sched.state_dict()
    # load_state_dict does __dict__.update(): an unknown key would set any attribute
    unknown = set(obj) - set(live)
    if unknown:
        raise no(f"unknown scheduler fields {sorted(map(str, unknown))[:3]}")
    for k, saved in obj.items():
        if k == "lr_lambdas":
            _check_lambdas(saved, live[k], no)
        elif not _same_kind(live[k], saved, exact=True):
            raise no(f"scheduler field {k} is {_show(saved)}, expected like {_show(live[k])}")
    if "last_epoch" in obj and not -1 <= obj["last_epoch"] < 2**53:
        raise no(f"scheduler field last_epoch is {obj['last_epoch']!r}")


def _check_lambdas(saved: Any, live: Any, no: No) -> None:
    # LambdaLR updates each lambda object's __dict__ with its saved entry
    if not isinstance(saved, list) or not isinstance(live, list) or len(saved) != len(live):
        raise no(f"scheduler field lr_lambdas is {_show(saved)}, expected like {_show(live)}")
    for s, lv in zip(saved, live, strict=True):
        if s is None:
            continue
        if not isinstance(s, dict) or not isinstance(lv, dict) or not set(s) <= set(lv):
            raise no(f"scheduler field lr_lambdas holds {_show(s)}, expected like {_show(lv)}")
        for name, value in s.items():
            if not _same_kind(lv[name], value, exact=True):
                raise no(f"scheduler lr_lambdas field {name} is {_show(value)}")


def _same_kind(live: Any, saved: Any, *, exact: bool = False) -> bool:
    """A saved value can replace the live one (lr, betas, momentum, flags); ``exact``:
    an int stays an int (a scheduler's counters)."""
    if isinstance(live, bool):
        return isinstance(saved, bool)
    if live is None:
        return saved is None or isinstance(saved, bool) or (not exact and _is_number(saved))
    if isinstance(live, int) and exact:
        return _is_int(saved)
    if isinstance(live, (int, float)):
        return _is_number(saved) or (
            isinstance(saved, torch.Tensor) and saved.numel() == 1 and not exact
        )
    if isinstance(live, torch.Tensor):
        if live.numel() == 1 and _is_number(saved):
            return True
        return isinstance(saved, torch.Tensor) and saved.shape == live.shape
    if isinstance(live, str):
        return isinstance(saved, str)
    if isinstance(live, (tuple, list)):
        return (
            isinstance(saved, (tuple, list))
            and len(saved) == len(live)
            and all(_same_kind(a, b, exact=exact) for a, b in zip(live, saved, strict=True))
        )
    if isinstance(live, dict):
        return (
            isinstance(saved, dict)
            and set(saved) <= set(live)
            and all(_same_kind(live[k], v, exact=exact) for k, v in saved.items())
        )
    return type(saved) is type(live)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _family(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.is_complex():
        return "complex"
    return "float" if t.is_floating_point() else "int"


def _show(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)}".replace("torch.", "")
    shown = repr(x)
    return shown if len(shown) <= 40 else shown[:37] + "..."
