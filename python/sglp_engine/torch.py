"""PyTorch integration: stream module outputs into a ``CkaAccumulator`` during a normal forward loop.

    >>> import torch, sglp_engine
    >>> from sglp_engine.torch import capture
    >>> acc = sglp_engine.CkaAccumulator(batch_size=256)
    >>> capture(model, r"^model\\.layers\\.\\d+$", loader, acc)      # doctest: +SKIP
    >>> res = acc.finish()                                          # doctest: +SKIP

Only one forward pass's outputs are held at a time: each batch's outputs go into the accumulator as soon as the
forward returns, then are dropped, so the calibration set is never gathered in memory.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import CkaAccumulator

__all__ = ["capture"]


def _modules(model: torch.nn.Module, which: Union[str, Sequence[str]]) -> List[Tuple[str, torch.nn.Module]]:
    """The modules to hook, in order: the names listed, or every module whose name matches the regular
    expression (searched, as the CLI's ``--layers``), in ``named_modules`` order."""
    named = dict(model.named_modules())
    if isinstance(which, str):
        pattern = re.compile(which)
        found = [(n, m) for n, m in named.items() if n and pattern.search(n)]
        if not found:
            raise ValueError(f"no module name matches '{which}'")
        return found
    missing = [n for n in which if n not in named]
    if missing:
        raise ValueError(f"the model has no module '{missing[0]}'")
    return [(n, named[n]) for n in which]


def _first_tensor(name: str, out: Any) -> torch.Tensor:
    """The activation in a module's output: the tensor itself, the first element of a tuple or list, or the first
    value of a dict or Hugging Face ``ModelOutput`` (e.g. a decoder layer's ``(hidden_states, ...)``)."""
    while not isinstance(out, torch.Tensor):
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        elif isinstance(out, Mapping) and out:
            out = next(iter(out.values()))
        else:
            raise ValueError(f"module '{name}': output of type {type(out).__name__} holds no tensor")
    return out


def _forward(model: torch.nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def capture(
    model: torch.nn.Module,
    module_names_or_regex: Union[str, Sequence[str]],
    batches: Iterable[Any],
    accumulator: CkaAccumulator,
    forward: Optional[Callable[[torch.nn.Module, Any], Any]] = None,
) -> CkaAccumulator:
    """Run ``batches`` through ``model`` under ``torch.no_grad()`` and stream the outputs of the chosen modules
    into ``accumulator`` (one ``update`` per batch, every chosen module's output as one layer).

    ``module_names_or_regex``: a list of module names (in the order wanted), or a regular expression over
    ``model.named_modules()``. A batch that is a dict is passed as keyword arguments, a tuple or list as
    positional arguments, anything else as the one argument; or pass ``forward(model, batch)``. Module outputs
    may be tensors, tuples or ``ModelOutput``s (the first tensor is taken); ``[batch, tokens, hidden]`` outputs
    follow the accumulator's ``tokens``. CPU tensors are read in place; CUDA tensors are copied to the host
    once per batch (with a ``CopyWarning``). Returns ``accumulator``.
    """
    modules = _modules(model, module_names_or_regex)
    outputs: Dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, _inputs, out):
            if name in outputs:
                raise ValueError(f"module '{name}' ran twice in one forward pass; hook a module that runs once")
            outputs[name] = _first_tensor(name, out)

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules]
    run = forward or _forward
    try:
        with torch.no_grad():
            for batch in batches:
                outputs.clear()
                run(model, batch)
                missing = [n for n, _ in modules if n not in outputs]
                if missing:
                    raise ValueError(f"module '{missing[0]}' produced no output in this forward pass")
                accumulator.update({n: outputs[n] for n, _ in modules})
    finally:
        for h in handles:
            h.remove()
        outputs.clear()
    return accumulator
