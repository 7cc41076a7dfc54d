"""The stage graph: order stages by their declared inputs and outputs, and find what depends on what."""

from __future__ import annotations

from pipeline.run.artifacts import ArtifactStore
from pipeline.run.errors import RunError
from pipeline.run.stage import Stage


def order_stages(stages: dict[str, Stage]) -> list[str]:
    """Topological order of the stages by inputs/outputs; ties keep the given (graph) order."""
    made_by: dict[str, str] = {}
    for st in stages.values():
        for out in st.outputs:
            if out in made_by:
                raise RunError(f"stages {made_by[out]!r} and {st.name!r} both write {out!r}; "
                               "fix: enable only one of them in graph")
            made_by[out] = st.name
    deps = {n: {made_by[i] for i in st.reads if i in made_by} for n, st in stages.items()}
    order: list[str] = []
    remaining = list(stages)
    while remaining:
        ready = [n for n in remaining if deps[n] <= set(order)]
        if not ready:
            cycle = ", ".join(f"{n} <- {sorted(deps[n] - set(order))}" for n in remaining)
            raise RunError(f"the stages depend on each other in a cycle: {cycle}")
        order.append(ready[0])
        remaining.remove(ready[0])
    return order


def producers(stages: dict[str, Stage]) -> dict[str, str]:
    """Output name -> the stage that writes it."""
    return {out: st.name for st in stages.values() for out in st.outputs}


def dependents(store: ArtifactStore, stages: dict[str, Stage], name: str) -> list[str]:
    """Stages that read, directly or transitively, an output of ``name``: the enabled ones and
    the ones known only from manifests on disk."""
    edges: dict[str, tuple[set[str], set[str]]] = {}
    for n, m in store.manifests().items():
        edges[n] = (set(m.get("declared_inputs", [])), set(m.get("declared_outputs", [])))
    for n, st in stages.items():
        edges[n] = (set(st.reads), set(st.outputs))
    found: list[str] = []
    frontier = set(edges.get(name, (set(), set()))[1])
    while frontier:
        new_out: set[str] = set()
        for n, (ins, outs) in edges.items():
            if n != name and n not in found and ins & frontier:
                found.append(n)
                new_out |= outs
        frontier = new_out
    return found


def upstream(stages: dict[str, Stage], name: str) -> set[str]:
    """Enabled stages whose outputs ``name`` reads, directly or transitively."""
    made_by = producers(stages)
    seen: set[str] = set()
    frontier = [name]
    while frontier:
        n = frontier.pop()
        for i in stages[n].reads:
            p = made_by.get(i)
            if p and p not in seen:
                seen.add(p)
                frontier.append(p)
    return seen
