"""Do our overrides still accept every call megatron-core makes to the methods they replace?

For each class of ours that subclasses a megatron-core class, every method it defines that
a megatron-core base also defines is compared with that base's signature: ours must take
every positional parameter in the same place, every keyword by name, keep optional what
upstream has optional (with the same default), and require nothing upstream does not
(``__init__`` may add required keyword-only settings, e.g. ``polycom=``, which our specs
pass). A release that adds a keyword to ``TEGroupedMLP.forward`` shows up here before a
GPU run raises TypeError.

Run as a script (one process per release, e.g. a Megatron-LM tree first on PYTHONPATH):
``python tests/signature_guard.py`` prints one JSON object with the methods compared and
every problem found.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys

P = inspect.Parameter
POSITIONAL = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)


def our_classes() -> list:
    """Every class defined in polycom_megatron that has a megatron-core base."""
    import polycom_megatron

    found = {}
    for info in pkgutil.walk_packages(polycom_megatron.__path__, "polycom_megatron."):
        if info.name.split(".")[1] in ("bench", "training", "patches", "cli", "data", "hf"):
            continue  # tooling (importing a __main__ would run it), not Megatron model modules
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if (inspect.isclass(cls) and cls.__module__ == module.__name__
                    and any(_is_upstream(base) for base in cls.__mro__[1:])):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[name] for name in sorted(found)]


def _is_upstream(cls) -> bool:
    return cls.__module__.startswith("megatron.")


def overrides(cls) -> list:
    """``(method name, our function, upstream class, upstream function)`` for cls."""
    from megatron.core.transformer.module import MegatronModule

    pairs = []
    mine = [c for c in cls.__mro__ if c.__module__.startswith("polycom_megatron")]
    for name in sorted({n for c in mine for n, v in vars(c).items() if inspect.isfunction(v)}):
        ours = getattr(cls, name)
        owner = next((base for base in cls.__mro__ if _is_upstream(base)
                      and inspect.isfunction(vars(base).get(name))), None)
        if owner is None:
            continue
        # A module's constructor is a contract only where our class replaces the upstream
        # one in a spec (MLP, experts, shared experts), not MegatronModule's bare one.
        if name == "__init__" and owner is MegatronModule:
            continue
        pairs.append((name, ours, owner, vars(owner)[name]))
    return pairs


def signature_problems(ours, upstream, constructor: bool = False) -> list:
    """Ways a call that ``upstream`` accepts could fail on ``ours`` (empty: compatible)."""
    o, u = inspect.signature(ours), inspect.signature(upstream)
    op, up = o.parameters, u.parameters
    o_args = any(p.kind == P.VAR_POSITIONAL for p in op.values())
    o_kwargs = any(p.kind == P.VAR_KEYWORD for p in op.values())
    o_pos = [p for p in op.values() if p.kind in POSITIONAL]
    problems = []
    for i, p in enumerate(q for q in up.values() if q.kind in POSITIONAL):
        if i < len(o_pos):
            if p.kind == P.POSITIONAL_OR_KEYWORD and o_pos[i].name != p.name:
                problems.append(f"positional #{i} is '{p.name}' upstream, '{o_pos[i].name}' ours")
        elif not o_args:
            problems.append(f"upstream takes '{p.name}' positionally, ours does not")
    for p in up.values():
        if p.kind == P.VAR_POSITIONAL and not o_args:
            problems.append("upstream takes *args, ours does not")
        if p.kind == P.VAR_KEYWORD and not o_kwargs:
            problems.append("upstream takes **kwargs, ours does not")
        if p.kind not in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY):
            continue
        q = op.get(p.name)
        if q is None or q.kind == P.POSITIONAL_ONLY:
            if not o_kwargs:
                problems.append(f"upstream keyword '{p.name}' missing from ours")
            continue
        if p.default is not P.empty:
            if q.default is P.empty:
                problems.append(f"'{p.name}' is optional upstream, required in ours")
            elif not _same_default(p.default, q.default):
                problems.append(f"'{p.name}' defaults to {p.default!r} upstream, "
                                f"{q.default!r} in ours")
    for q in op.values():
        if q.name in up or q.default is not P.empty or q.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
            continue
        if not (constructor and q.kind == P.KEYWORD_ONLY):
            problems.append(f"ours requires '{q.name}', which upstream callers do not pass")
    return problems


def _same_default(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # e.g. tensors: compare identity only
        return a is b


def run_all() -> dict:
    from megatron.core import package_info

    compared, problems = [], {}
    for cls in our_classes():
        for name, ours, owner, upstream in overrides(cls):
            where = f"{cls.__name__}.{name} vs {owner.__name__}.{name}"
            compared.append(where)
            found = signature_problems(ours, upstream, constructor=name == "__init__")
            if found:
                problems[where] = found
    return {"megatron_core": package_info.__version__, "compared": compared,
            "problems": problems}


if __name__ == "__main__":
    print("SIGNATURES " + json.dumps(run_all()))
    sys.exit(0)
