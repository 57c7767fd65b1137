"""The one place that walks a model: discover its structure, list compressible modules, swap
replacements in.

Discovery needs no table: the block list is the outermost `ModuleList` of identically-typed
modules holding weight-bearing modules (`model.layers`, `transformer.h`, `encoder.layer`,
`model.decoder.layers`, ...); the weight-bearing modules are `nn.Linear`, transformers' `Conv1D`
(weight stored transposed, in × out: read through `linear_view`), and `nn.Embedding`; the input
embedding and the LM head are what the model's `get_input_embeddings` / `get_output_embeddings`
return. A block module's role is its path inside the block; `offcomp.adapters` adds friendly
aliases. Which modules read one input is traced on one forward pass (`shared_inputs`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from .adapters import FORWARD_QUIRKS, UNSUPPORTED_CONFIG, aliases_for, fused_for
from .errors import OffcompError
from .layers import CompressedModule, FusedSlices, Rows, take_rows
from .plan import ModuleInfo

SLICE = ":"  # "<module>:<slice>" names a row slice of a fused projection (attn.c_attn:k)
_PLAIN_FORWARD = {nn.Linear: nn.Linear.forward, nn.Embedding: nn.Embedding.forward, Conv1D: Conv1D.forward}


def weight_kind(mod: nn.Module) -> str | None:
    """"linear" (nn.Linear, Conv1D), "embedding" (nn.Embedding), or None."""
    if isinstance(mod, nn.Linear | Conv1D):
        return "linear"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    return None


def linear_view(mod: nn.Module) -> nn.Module:
    """The module as an (out × in) nn.Linear: Conv1D keeps its weight transposed (in × out), so
    methods get a Linear that shares its storage (a transposed view) and its bias."""
    if not isinstance(mod, Conv1D):
        return mod
    view = nn.Linear(mod.weight.shape[0], mod.weight.shape[1], bias=False, device="meta")
    view.weight = nn.Parameter(mod.weight.detach().T, requires_grad=False)
    view.bias = mod.bias
    return view


def is_transposed(mod: nn.Module) -> bool:
    """Whether the module stores its weight as (in, out) (transformers' Conv1D)."""
    return isinstance(mod, Conv1D)


def oriented_weight(mod: nn.Module) -> torch.Tensor:
    """The weight as (out, in) for a linear, (num, dim) for an embedding, whatever the storage."""
    return mod.weight.T if isinstance(mod, Conv1D) else mod.weight


@dataclass(frozen=True)
class Structure:
    """What offcomp knows of a model: block list, compressible modules, roles and aliases."""

    model_type: str
    blocks: str  # dotted path of the block list, e.g. "model.layers"
    block_type: str
    n_layers: int
    modules: tuple[ModuleInfo, ...]
    aliases: dict[str, str]  # friendly role → path inside a block (only those present)
    embed: str | None
    lm_head: str | None
    transposed: frozenset[str]  # Conv1D modules (weight stored in × out)
    tied: tuple[tuple[str, ...], ...]  # modules sharing one weight tensor
    refused: dict[str, str]  # module → why it cannot be replaced faithfully
    # row slices of fused projections, addressable as modules of their own: "<module>:<slice>" →
    # (module, its rows: a range, or the row indices of a slice interleaved per head)
    slices: dict[str, tuple[str, Rows]]
    fused: dict[str, tuple[tuple[str, ...], str]]  # fused projection's path in a block → (slice names, layout)
    # slice roles (and their aliases) whose rows cannot be located in this model → why
    unsliced: dict[str, str]

    def roles(self) -> dict[str, str]:
        """Every name a plan may use as a role → the canonical role it selects."""
        out = {m.role: m.role for m in self.modules if m.role}
        out.update(self.aliases)
        return out

    def block_paths(self) -> list[str]:
        """Paths inside a block of its linear modules, in module order."""
        seen: dict[str, None] = {}
        for m in self.modules:
            if m.layer is not None and m.kind == "linear" and m.role and SLICE not in m.role:
                seen.setdefault(m.role, None)
        return list(seen)

    def default_modules(self) -> list[str]:
        """Every linear of the blocks, named by alias where there is one, sorted."""
        named = {v: k for k, v in self.aliases.items()}
        return sorted(named.get(p, p) for p in self.block_paths())

    def layer_regex(self) -> re.Pattern[str]:
        return re.compile(r"^" + re.escape(self.blocks) + r"\.(\d+)\.(.+)$")


def _check_supported(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    for key, why in UNSUPPORTED_CONFIG.items():
        v = getattr(cfg, key, None) if cfg is not None else None
        if v is True or (isinstance(v, int) and not isinstance(v, bool) and v > 1):
            raise OffcompError(f"{type(model).__name__}: {why} (config.{key} = {v})")


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(c) for c in mod}) == 1 and any(
            weight_kind(x) or isinstance(x, CompressedModule) for x in mod[0].modules()
        ):
            found.append((name, mod))
    top = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]
    if not top:
        raise OffcompError(f"{type(model).__name__}: no repeated block list (a ModuleList of identical blocks "
                           "holding linear layers) found; offcomp compresses transformer stacks")
    if len(top) > 1:
        raise OffcompError(f"{type(model).__name__} has several block lists ({', '.join(n for n, _ in top)}); "
                           "models with more than one stack (encoder-decoder, vision towers) are not supported")
    return top[0]


def _name_of(model: nn.Module, getter: str) -> str | None:
    try:
        mod = getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return None
    if mod is None:
        return None
    return next((n for n, m in model.named_modules() if m is mod), None)


@torch.no_grad()
def _refusal(mod: nn.Module) -> str | None:
    """Why replacing `mod` by a weight-based module would change what it computes, if it would.

    A subclass that overrides the base forward (FalconLinear, Gemma's scaled embedding, OPT's
    position embedding with its offset) is probed once on a small input: it is replaceable when
    it computes the plain function of its weight (and bias), times its `FORWARD_QUIRKS` scale."""
    base = next((b for b in _PLAIN_FORWARD if isinstance(mod, b)), None)
    if base is None or type(mod).forward is _PLAIN_FORWARD[base] or mod.weight.is_meta:
        return None
    w = oriented_weight(mod)
    g = torch.Generator(device="cpu").manual_seed(0)
    try:
        if base is nn.Embedding:
            x = torch.randint(0, w.shape[0], (1, 4), generator=g).to(w.device)
            want = w[x]
        else:
            x = torch.randn(2, w.shape[1], generator=g).to(w)
            want = x @ w.T + (mod.bias if mod.bias is not None else 0)
        for q in FORWARD_QUIRKS:
            if isinstance(getattr(mod, q, None), torch.Tensor | float | int):
                want = want * getattr(mod, q)
        got = mod(x)
        same = isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, 1e-4, 1e-5)
    except Exception:  # noqa: BLE001  (a forward that needs other arguments is not a plain one)
        same = False
    if same:
        return None
    return (f"{type(mod).__name__}.forward computes more than its weight (e.g. a position offset), "
            "which a replacement would not reproduce")


def discover(model: nn.Module) -> Structure:
    """The structure of any PreTrainedModel with one stack of identical blocks."""
    _check_supported(model)
    blocks, layers = _block_list(model)
    rx = re.compile(r"^" + re.escape(blocks) + r"\.(\d+)\.(.+)$")
    embed, head = _name_of(model, "get_input_embeddings"), _name_of(model, "get_output_embeddings")
    infos, transposed, refused, owners = [], set(), {}, {}
    for name, mod in model.named_modules():
        kind = weight_kind(mod)
        if kind is None:
            continue
        m = rx.match(name)
        layer, role = (int(m.group(1)), m.group(2)) if m else (None, None)
        if name == embed:
            role = "embed"
        elif name == head:
            role = "lm_head"
        infos.append(ModuleInfo(name, kind, tuple(oriented_weight(mod).shape), layer, role))  # type: ignore[arg-type]
        if isinstance(mod, Conv1D):
            transposed.add(name)
        if (why := _refusal(mod)) is not None:
            refused[name] = why
        owners.setdefault(id(mod.weight), []).append(name)
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    paths = {i.role for i in infos if i.layer is not None}
    aliases = {k: v for k, v in aliases_for(model_type).items() if v in paths}
    slices: dict[str, tuple[str, Rows]] = {}
    cfg = getattr(model, "config", None)
    fused_paths = {p: v for p, v in fused_for(model_type, cfg).items() if p in paths}
    unsliced: dict[str, str] = {}
    for path, (parts, layout) in fused_paths.items():
        alias = next((a for a, p in aliases.items() if p == path), None)
        names = {k: [f"{path}{SLICE}{k}"] + ([f"{alias}{SLICE}{k}", f"{alias.split('.')[0]}.{k}"] if alias else [])
                 for k in parts}
        rows_by_shape: dict[tuple[int, int], dict[str, Rows] | str] = {}
        for info in [i for i in infos if i.layer is not None and i.role == path]:
            if info.shape not in rows_by_shape:  # one layout per shape: row index tuples shared by all layers
                rows_by_shape[info.shape] = _slice_rows(cfg, parts, layout, info.shape[0])
            rows = rows_by_shape[info.shape]
            if isinstance(rows, str):
                for k in parts:
                    for n in names[k]:
                        unsliced.setdefault(n, f"the {k} rows of {info.name} cannot be located: {rows}; "
                                               f"compress {path} whole")
                continue
            for k, r in rows.items():
                slices[f"{info.name}{SLICE}{k}"] = (info.name, r)
                infos.append(ModuleInfo(f"{info.name}{SLICE}{k}", "linear", (len(r), info.shape[1]), info.layer,
                                        f"{path}{SLICE}{k}"))
        if not any(isinstance(r, str) for r in rows_by_shape.values()):
            for k in parts if alias else ():
                aliases[f"{alias}{SLICE}{k}"] = f"{path}{SLICE}{k}"
                aliases.setdefault(f"{alias.split('.')[0]}.{k}", f"{path}{SLICE}{k}")  # attn.k, mlp.gate
    return Structure(model_type, blocks, type(layers[0]).__name__, len(layers), tuple(infos), aliases, embed, head,
                     frozenset(transposed), tuple(tuple(v) for v in owners.values() if len(v) > 1), refused, slices,
                     fused_paths, {n: why for n, why in unsliced.items() if n not in aliases})


def _slice_rows(cfg: Any, parts: tuple[str, ...], layout: str, out: int) -> dict[str, Rows] | str:
    """The rows of each slice of a fused projection with `out` rows, in the order the model reads
    them (head by head), or why they cannot be located. Layouts: offcomp.adapters.FUSED."""
    if len(parts) == 2 and layout == "blocks":  # gate/up halves
        if out % 2:
            return f"{out} rows do not split into two halves"
        return {parts[0]: range(out // 2), parts[1]: range(out // 2, out)}
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads and hidden else None)
    if len(parts) != 3 or not heads or not head_dim:
        return f"the config gives no head count and head size to split {'/'.join(parts)} by"
    q, k, v = parts
    n_q = heads * head_dim
    if layout == "blocks":
        if out <= n_q or (out - n_q) % 2:
            return f"{out} rows are not {heads} query heads × {head_dim} plus two equal key/value blocks"
        n_kv = (out - n_q) // 2
        return {q: range(n_q), k: range(n_q, n_q + n_kv), v: range(n_q + n_kv, out)}
    if layout == "per_head":  # [h0: q k v, h1: q k v, ...]
        if out != 3 * n_q:
            return f"{out} rows are not {heads} heads × (q, k, v) × {head_dim}"
        return {p: tuple(h * 3 * head_dim + j * head_dim + d for h in range(heads) for d in range(head_dim))
                for j, p in enumerate(parts)}
    if layout == "per_group":  # [g0: its query heads, k, v; g1: ...]
        kv = getattr(cfg, "num_kv_heads", None) or getattr(cfg, "num_key_value_heads", None)
        if not kv or heads % kv or out != kv * (heads // kv + 2) * head_dim:
            return (f"{out} rows are not {kv} key/value groups of ({heads} / {kv} query heads + k + v) × "
                    f"{head_dim}")
        per, stride = heads // kv, (heads // kv + 2) * head_dim
        return {q: tuple(g * stride + d for g in range(kv) for d in range(per * head_dim)),
                k: tuple(g * stride + per * head_dim + d for g in range(kv) for d in range(head_dim)),
                v: tuple(g * stride + (per + 1) * head_dim + d for g in range(kv) for d in range(head_dim))}
    return f"offcomp knows no fused-projection layout {layout!r}"


def fused(structure: Structure) -> dict[str, tuple[tuple[str, ...], str]]:
    """Fused projections present in the model: path inside a block → (slice names, layout)."""
    return dict(structure.fused)


def skeleton(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """A weightless (meta-device) base model of a config or model type, enough to discover structure."""
    from transformers import AutoConfig, AutoModel

    if isinstance(config, str):
        config = AutoConfig.for_model(config)
    try:
        with torch.device("meta"):
            return AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise OffcompError(f"cannot build a {getattr(config, 'model_type', config)!r} model: "
                           f"{str(e).splitlines()[0]}") from None


def default_modules(model_or_config: Any, trust_remote_code: bool = False) -> list[str]:
    """The quick form's default selection: every linear of the blocks (aliases where known)."""
    model = model_or_config if isinstance(model_or_config, nn.Module) else skeleton(model_or_config, trust_remote_code)
    return discover(model).default_modules()


def module_table(model: nn.Module) -> list[ModuleInfo]:
    """Every nn.Linear / Conv1D / nn.Embedding with its (out, in) weight shape, block index and role."""
    return list(discover(model).modules)


def role_table(model: nn.Module) -> dict[str, str]:
    """Role or alias → canonical role (path inside a block, `embed`, `lm_head`)."""
    return discover(model).roles()


def layer_list(model: nn.Module) -> list[nn.Module]:
    return list(model.get_submodule(discover(model).blocks))


@torch.no_grad()
def shared_inputs(model: nn.Module, names: list[str] | None = None, seq_len: int = 8) -> dict[str, str]:
    """module name → the first module (in call order) that reads the very same input tensor, found by
    tracing one forward pass on a tiny input; a module reading its own input maps to itself.

    Identity of the input tensor, not naming rules: q/k/v of LLaMA, GPT-2's c_attn alone, Falcon's
    fused QKV together with its parallel MLP. If the model cannot run a bare `input_ids` forward,
    every module keeps its own input (correct, only slower to capture)."""
    wanted = set(names) if names is not None else {i.name for i in discover(model).modules if i.kind == "linear"}
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, mod in model.named_modules():
        if name in wanted:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, name=name: seen.append((name, args[0])) if args else None))
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2) or 2
    dev = next(model.parameters()).device
    ids = (torch.arange(seq_len, device=dev) % vocab + (1 if vocab > seq_len + 1 else 0))[None]
    was_training = model.training
    try:
        model.eval()
        model(input_ids=ids)
    except Exception:  # noqa: BLE001  (tracing is an optimisation; no sharing is still correct)
        seen.clear()
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    out: dict[str, str] = {}
    leaders: list[tuple[torch.Tensor, str]] = []
    for name, x in seen:
        if name in out:
            continue
        leader = next((n for t, n in leaders if t is x), None)
        if leader is None:
            leaders.append((x, name))
        out[name] = leader or name
    for n in wanted:
        out.setdefault(n, n)
    return out


def module_view(model: nn.Module, name: str) -> nn.Module:
    """The module a method reads for `name`, as an (out × in) linear: `linear_view` of a module, or
    for a slice "<module>:<k>" its part (once the module is split) or its rows (a view when contiguous)."""
    base, _, k = name.partition(SLICE)
    mod = model.get_submodule(base)
    if not k:
        return linear_view(mod)
    if isinstance(mod, FusedSlices):
        return mod.parts[k]
    _, rows = discover(model).slices[name]
    view = nn.Linear(1, 1, bias=False, device="meta")
    view.weight = nn.Parameter(take_rows(oriented_weight(mod).detach(), rows), requires_grad=False)
    view.bias = None if mod.bias is None else nn.Parameter(take_rows(mod.bias.detach(), rows), requires_grad=False)
    view.in_features, view.out_features = view.weight.shape[1], len(rows)
    return view


def _split_fused(model: nn.Module, base: str) -> FusedSlices:
    """Replace the fused module `base` by its slices (plain parts) once; returns the container."""
    mod = model.get_submodule(base)
    if isinstance(mod, FusedSlices):
        return mod
    rows = {n.partition(SLICE)[2]: r for n, (owner, r) in discover(model).slices.items() if owner == base}
    container = FusedSlices.split(oriented_weight(mod), mod.bias, rows)
    replace_module(model, base, container)
    return container


def _scaled_forward(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
    return out * mod.embed_scale.to(out.dtype)


def install(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put the replacement `new` where `name` is, carrying over what the original's forward does
    besides its weight (`FORWARD_QUIRKS`: Gemma's embed_scale); returns the original."""
    if SLICE in name:
        _split_fused(model, name.partition(SLICE)[0])
    old = replace_module(model, name, new)
    scale = getattr(old, "embed_scale", None)
    if scale is not None and not hasattr(new, "embed_scale"):  # installed once, even if swapped in again
        t = scale.detach().clone() if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))
        new.register_buffer("embed_scale", t.to(device=next(new.parameters()).device), persistent=False)
        new.register_forward_hook(_scaled_forward)
    return old


def densify_(model: nn.Module) -> int:
    """Replace every compressed module by a plain module computing the same function, shaped and
    oriented like the architecture's own (Conv1D stays Conv1D), so `save_pretrained` writes a
    checkpoint vanilla `from_pretrained` loads. Forward quirks (embed_scale) are the architecture's
    own and come back with it. Returns how many modules were replaced."""
    import copy

    with torch.device("meta"):
        skeleton = type(model)(copy.deepcopy(model.config))
    n, done = 0, []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, CompressedModule) or any(name.startswith(d + ".") for d in done):
            continue  # a slice inside a split fused module goes with it
        done.append(name)
        dense = mod.dense_module()
        if isinstance(skeleton.get_submodule(name), Conv1D):
            conv = Conv1D(dense.weight.shape[0], dense.weight.shape[1]).to(dense.weight)
            conv.weight = nn.Parameter(dense.weight.detach().T.contiguous())
            if dense.bias is not None:
                conv.bias = nn.Parameter(dense.bias.detach().clone())
            else:
                nn.init.zeros_(conv.bias)
            dense = conv
        replace_module(model, name, dense)
        n += 1
    return n


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` is and return what was there (a slice: into the split module)."""
    base, _, k = name.partition(SLICE)
    if k:
        container = model.get_submodule(base)
        old = container.parts[k]
        container.parts[k] = new
        return old
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
