"""The method registry: every attention method ``dam eval`` / ``dam bench`` can run, by name.

A method is named ``NAME`` or ``NAME:key=value[:key=value...]`` (parameters, e.g. ``dam:last_query=0.1``,
``minference:last_q=128``). Each :class:`Method` says how to run it on one input: the artifact to
apply, the last-query estimate budget, and an optional ``layout_hook`` that replaces the planned
layouts. Methods other than ``dam`` and artifact-backed ones run at the block density (or recall)
DAM measured on the same input (``matched``), so fidelity is compared at equal density.

Built in: ``dam`` (the artifact as the runtime runs it), ``streaming`` (sink + window of DAM's
density), ``oracle`` (the heaviest true-mass blocks reaching DAM's recall: the floor of any
block-sparse method, not a usable method), ``minference`` (vertical + slash blocks from the last
queries' attention), ``element`` (DAM's element-level last-query estimate alone, no programs),
and ``artifact`` (any other artifact given by name, e.g. ``dam-paper``). :func:`register` adds one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dam.compiler import Artifact
from dam.compiler.ir import LAST_QUERY_QUERIES

from ..errors import DamRuntimeError
from .baselines import ElementVSHook, MInferenceHook, OracleHook, streaming_artifact

#: queries the last-query baselines look at by default (MInference's own choice)
LAST_Q = LAST_QUERY_QUERIES


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name: ``name`` (the display name, as given), ``kind`` (the registry key)
    and its parameters."""

    name: str
    kind: str
    params: Mapping[str, str] = field(default_factory=dict)

    def number(self, key: str, default: float | None) -> float | None:
        if key not in self.params:
            return default
        try:
            return float(self.params[key])
        except ValueError:
            raise DamRuntimeError(f"method {self.name!r}: {key} must be a number, got {self.params[key]!r}") from None


@dataclass(frozen=True)
class RunContext:
    """What a method is built from for one input: the artifacts by name, DAM's measured density
    and recall on this input (``None`` while DAM itself runs), the input length, and the
    evaluation settings (``max_elements``, DAM's default ``last_query``)."""

    artifacts: Mapping[str, Artifact]
    length: int
    density: float | None = None
    recall: float | None = None
    max_elements: int = 1 << 24
    last_query: float | None = None
    cache: dict = field(default_factory=dict)

    def target(self, spec: MethodSpec) -> tuple[float, float]:
        if self.density is None or self.recall is None:
            raise DamRuntimeError(f"method {spec.name!r} is matched to DAM: run 'dam' first")
        return self.density, self.recall


@dataclass(frozen=True)
class Plan:
    """How to run one method on one input."""

    artifact: Artifact
    last_query: float | None = None
    hook: Callable[[Any], Callable | None] | None = None  # fn(handle) -> layout_hook


@dataclass(frozen=True)
class Method:
    kind: str
    help: str
    matched: bool  # run at DAM's measured density/recall on the same input
    params: tuple[str, ...]
    build: Callable[[MethodSpec, RunContext], Plan]


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method under ``method.kind``."""
    REGISTRY[method.kind] = method
    return method


def parse(name: str, artifacts: Mapping[str, Artifact] = {}) -> MethodSpec:  # noqa: B006 (read only)
    """``"minference:last_q=128"`` -> ``MethodSpec``; a bare name that is a given artifact (other
    than ``dam``) is the ``artifact`` method of that artifact."""
    base, *items = name.strip().split(":")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in items)):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DamRuntimeError(f"method {name!r}: parameters are key=value, got {item!r}")
        params[key.strip()] = value.strip()
    if base in REGISTRY and base != "artifact":
        kind = base
    elif base in artifacts:
        kind, params = "artifact", {"name": base, **params}
    else:
        known = sorted(k for k in REGISTRY if k != "artifact")
        raise DamRuntimeError(f"unknown method {base!r}: choose from {', '.join(known)}, or name a given artifact")
    method = REGISTRY[kind]
    bad = sorted(set(params) - set(method.params) - ({"name"} if kind == "artifact" else set()))
    if bad:
        raise DamRuntimeError(f"method {name!r}: unknown parameter(s) {bad}; {kind} takes "
                              f"{', '.join(method.params) or 'none'}")
    spec = MethodSpec(name.strip(), kind, params)
    return spec


def plan(spec: MethodSpec, ctx: RunContext) -> Plan:
    return REGISTRY[spec.kind].build(spec, ctx)


def is_matched(spec: MethodSpec) -> bool:
    return REGISTRY[spec.kind].matched


def _dam(spec: MethodSpec, ctx: RunContext) -> Plan:
    return Plan(ctx.artifacts["dam"], last_query=spec.number("last_query", ctx.last_query))


def _artifact(spec: MethodSpec, ctx: RunContext) -> Plan:
    return Plan(ctx.artifacts[spec.params["name"]], last_query=spec.number("last_query", None))


def _streaming(spec: MethodSpec, ctx: RunContext) -> Plan:
    density, _ = ctx.target(spec)
    key = ("streaming", ctx.length, round(density, 6))
    if key not in ctx.cache:
        ctx.cache[key] = streaming_artifact(ctx.artifacts["dam"], ctx.length, density)
    return Plan(ctx.cache[key])


def _oracle(spec: MethodSpec, ctx: RunContext) -> Plan:
    _, recall = ctx.target(spec)
    return Plan(ctx.artifacts["dam"], last_query=0.0,
                hook=lambda h: OracleHook(h, min(recall, 1.0), ctx.max_elements))


def _vs(hook_cls):
    def build(spec: MethodSpec, ctx: RunContext) -> Plan:
        density, _ = ctx.target(spec)
        last_q = int(spec.number("last_q", LAST_Q))
        if last_q < 1:
            raise DamRuntimeError(f"method {spec.name!r}: last_q must be positive")
        return Plan(ctx.artifacts["dam"], last_query=0.0, hook=lambda h: hook_cls(h, density, last_q))

    return build


register(Method("dam", "the DAM artifact as the runtime runs it", False, ("last_query",), _dam))
register(Method("artifact", "another given artifact (e.g. dam-paper), run as DAM runs", False, ("last_query",),
                _artifact))
register(Method("streaming", "StreamingLLM-style sink + window at DAM's density", True, (), _streaming))
register(Method("oracle", "heaviest true-mass blocks reaching DAM's recall (a floor, not usable)", True, (),
                _oracle))
register(Method("minference", "MInference-style vertical + slash blocks from the last queries", True,
                ("last_q",), _vs(MInferenceHook)))
register(Method("element", "DAM's element-level last-query estimate alone, no programs", True, ("last_q",),
                _vs(ElementVSHook)))

__all__ = ["LAST_Q", "REGISTRY", "Method", "MethodSpec", "Plan", "RunContext", "is_matched", "parse", "plan",
           "register"]
