"""`offcomp inspect MODEL`: what offcomp discovers in a model, so a plan can be written for a model
offcomp has never seen: the block list, each role (its path inside a block, its friendly alias),
shapes, the share of the model's parameters, the break-even rank of every matrix, tied tensors,
the modules that read one input (traced), fused projections, and a ready-to-edit plan skeleton."""

from __future__ import annotations

from typing import Any

import torch.nn as nn
import yaml

from .errors import OffcompError
from .plan import ModuleInfo
from .swap import Structure, discover, shared_inputs


def break_even(shape: tuple[int, int]) -> float:
    """Rank at which two factors (n×r, r×m) store as much as the n×m matrix: n·m/(n+m)."""
    n, m = shape
    return n * m / (n + m)


def _unique_params(model: nn.Module) -> int:
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def _input_sets(model: nn.Module, s: Structure) -> list[list[str]]:
    """Paths inside a block that read one input, in call order (traced on layer 0)."""
    # modules only: a fused projection's row slices are views of it (a skeleton listing both is refused)
    first = [m.name for m in s.modules if m.layer == 0 and m.kind == "linear" and m.name not in s.slices]
    leader = shared_inputs(model, first)
    prefix = f"{s.blocks}.0."
    sets: dict[str, list[str]] = {}
    for name in first:
        sets.setdefault(leader[name], []).append(name.removeprefix(prefix))
    order = {n.removeprefix(prefix): i for i, n in enumerate(leader)}  # call order
    return sorted(sets.values(), key=lambda paths: order.get(paths[0], 0))


def _group_name(mods: list[str]) -> str:
    heads = {m.split(".")[0] for m in mods}
    if len(heads) == 1 and all("." in m for m in mods):
        return f"{heads.pop()}-" + "-".join(m.split(".", 1)[1] for m in mods)
    return "-".join(mods)


def plan_skeleton(s: Structure, input_sets: list[list[str]]) -> str:
    """A plan with one group per set of modules reading one input (SVD at ratio 0.8), as YAML
    with comments; valid as is for `offcomp compress --plan`."""
    alias = {v: k for k, v in s.aliases.items()}
    groups = []
    for paths in input_sets:
        mods = [alias.get(p, p) for p in paths]
        groups.append({"name": _group_name(mods), "modules": mods, "layers": "all", "joint": False,
                       "method": "svd", "ratio": 0.8})
    body = yaml.safe_dump({"version": 1, "groups": groups}, sort_keys=False, default_flow_style=None)
    head = (f"# offcomp plan for {s.model_type or 'this model'} ({s.n_layers} blocks at {s.blocks}).\n"
            "# One group per set of modules that read one input; edit methods and budgets (rank | ratio | cr),\n"
            "# set joint: true to share one factor across the group's layers, `offcomp methods` lists options.\n")
    tail = ""
    if s.embed:
        tied = any(s.embed in t and s.lm_head in t for t in s.tied)
        mods = "[embed, lm_head]" if tied else "[embed]"
        note = " (tied to the LM head: compress both)" if tied else ""
        tail = (f"  # the token embedding{note} can be compressed too:\n"
                f"  # - {{name: embed, modules: {mods}, method: svd, ratio: 0.8}}\n")
    for path, (parts, _) in s.fused.items():
        roles = [alias.get(f"{path}:{k}", f"{path}:{k}") for k in parts]
        if all(r in s.roles() for r in roles):  # slices addressable in this model
            pick = roles[1] if len(roles) == 3 else roles[0]  # the key slice of a q/k/v
            tail += (f"  # {alias.get(path, path)} is fused; its row slices {', '.join(roles)} are roles too (a plan\n"
                     f"  # names the matrix or its slices, not both), e.g.\n"
                     f"  # - {{name: {pick}, modules: [{pick}], joint: true, method: svd, ratio: 0.8}}\n")
    return head + body + tail


def _row(info: ModuleInfo, total: int, n_layers: int = 1) -> dict[str, Any]:
    params = info.shape[0] * info.shape[1] * n_layers
    return {"kind": info.kind, "shape": list(info.shape), "params": params, "share": params / total,
            "break_even_rank": round(break_even(info.shape), 1)}


def inspect_structure(model: nn.Module) -> dict[str, Any]:
    """The inspection record of a loaded model (see the module doc)."""
    s = discover(model)
    total = _unique_params(model)
    alias = {v: k for k, v in s.aliases.items()}
    sets = _input_sets(model, s)
    reads_with = {p: [q for q in ps if q != p] for ps in sets for p in ps}
    roles = []
    for path in s.block_paths():
        layer0 = next(m for m in s.modules if m.layer is not None and m.role == path)
        n = sum(1 for m in s.modules if m.role == path)
        roles.append({"role": path, "alias": alias.get(path), **_row(layer0, total, n), "layers": n,
                      "conv1d": f"{s.blocks}.{layer0.layer}.{path}" in s.transposed,
                      "fused": list(s.fused[path][0]) if path in s.fused else None,
                      "fused_layout": s.fused[path][1] if path in s.fused else None,
                      "slices_refused": next((why for n, why in s.unsliced.items() if n.startswith(path + ":")), None),
                      "reads_input_with": reads_with.get(path, [])})
    other = [{"name": m.name, "role": m.role, **_row(m, total), "refused": s.refused.get(m.name)}
             for m in s.modules if m.layer is None]
    return {
        "model_type": s.model_type, "class": type(model).__name__, "params": total,
        "blocks": {"path": s.blocks, "type": s.block_type, "layers": s.n_layers},
        "roles": roles, "other": other, "embed": s.embed, "lm_head": s.lm_head,
        "tied": [list(t) for t in s.tied], "shared_inputs": sets,
        "default_modules": s.default_modules(), "plan": plan_skeleton(s, sets),
    }


def inspect_model(name: str, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Load a base model (weights are needed to trace which modules read one input) and inspect it."""
    from .models import is_compressed_dir, load_model

    if is_compressed_dir(name):
        raise OffcompError(f"{name} is a compressed checkpoint; inspect its base model (see its offcomp.json)")
    bundle = load_model(name, trust_remote_code=trust_remote_code)
    return {"model": bundle.protocol(), **inspect_structure(bundle.model)}
