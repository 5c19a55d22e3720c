"""timm and torchvision ResNet / ViT weights mapped onto lamina's resnet and vit families, every tensor checked.

    model, info = lamina.hub.load("timm:path/to/resnet50.a1_in1k")   # timm's HF-hub folder: config.json +
                                                                     # model.safetensors (or pytorch_model.bin)
    model, info = lamina.hub.load("timm:resnet18-f37072fd.pth")      # a torch state dict (torchvision's names)
    model, info = lamina.hub.load("timm:vit_small_patch16_224:w.pth", num_classes=10, img_size=384)
    lamina finetune CONFIG model.pretrained=timm:PATH                # fine-tune it on a run's data

Sources are `timm:PATH` or `timm:ARCH:PATH` (ARCH a timm model name such as vit_tiny_patch16_224, which a bare
state file does not carry; a folder's config.json says it in "architecture"). Files are read safely: safetensors,
or torch.load(weights_only=True) (lamina.hub.torchfile). Nothing is downloaded.

The architecture comes from the tensors themselves (shapes only, before anything is built, so the model holds
exactly what the file holds): ResNet blocks per stage, basic/bottleneck, widths, classes; ViT patch size, width,
depth, MLP ratio, position grid, cls token or not. A ViT's head count is not in any shape: it comes from
config.json's model_args.num_heads, else the timm name (tiny 3, small 6, base 12, large/huge 16 heads), else the
load is refused (or pass n_head=). Names (timm's ResNet names are torchvision's: conv1, bn1, layer1.0.conv1, downsample.0/1, fc):

    ResNet  conv1 -> stem.0   bn1 -> stem.1   layer{i}.{j}.* -> stages.{i-1}.{j}.*   fc -> fc
    ViT     blocks.N.norm1/norm2 -> ln_1/ln_2   attn.qkv (3D, D) -> attn.q_proj/k_proj/v_proj (split in thirds)
            attn.proj -> attn.out_proj   mlp.fc1/fc2 -> mlp.fc/out_proj   cls_token, pos_embed, patch_embed.proj,
            norm, head unchanged

Every file tensor is matched by name and shape before anything is copied; missing / unexpected / mismatched
tensors are one CheckpointError naming the first few and the counts (num_batches_tracked may be absent: old
torchvision files lack it). What lamina's families cannot compute the same way is refused with one line naming
it: deep stems and avg-pool shortcuts (resnet*c/d), grouped or wide bottlenecks (ResNeXt, wide_resnet), SE blocks;
ViT register tokens, distillation tokens, pos_embed without the class token (no_embed_class), layer scale, qk-norm,
pre-norm, fc_norm / average pooling after a cls token, attention-pool heads, qkv without bias, non-GELU MLPs.

Options: num_classes (another head: the file's head is skipped, the new one initialised and info["head"] says
so), img_size (ViT: pos_embed resampled once at load, bicubic with antialias, as timm's resample_abs_pos_embed
does when a checkpoint meets another image size); other options go to the model factory (dropout, drop_path).

Parity reference (tests/test_hub_timm.py): timm 1.0.31 itself. timm.create_model(name, pretrained=False) with every
tensor randomised (BN statistics too), saved as .pth and through timm's own save_for_hf (config.json +
model.safetensors); lamina's logits are asserted equal to timm's in fp32 eval mode to 1e-5, and came out
bit-identical (max |difference| 0.0) for resnet18, resnet50, vit_tiny_patch16_224 at 224 px and at 160 px (pos_embed
resampled here vs timm's checkpoint_filter_fn), and a class-token-free average-pooled ViT. Why not another
reference: every timm release imports torchvision at module level (1.x: timm/layers/create_norm.py and norm_act.py
`from torchvision.ops.misc import FrozenBatchNorm2d`; 0.6.x/0.9.x through timm.data's transforms and norm_act), and
PyPI's torchvision does not import with this CPU torch (0.28.0, the build pinned to torch 2.13.0, links
libc10_cuda.so). So the test imports timm with a stand-in `torchvision` whose every class raises when used
(scripts/timm_weights.py, import_timm): timm's ResNet and ViT code never touches it, so the numbers are timm's own.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from lamina.errors import CheckpointError

# timm ViT sizes -> heads (width, depth and the rest are read from the shapes); head size 64 for all of these
_VIT_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16}
_VIT_NAME = re.compile(r"^(?:vit|deit)_(tiny|small|medium|base|large|huge)_patch(\d+)")
_ARCH = re.compile(r"^(?:resnet\d+[a-z]*|wide_resnet\w*|resnext\w*|(?:vit|deit)_\w+)(?:\.\w+)?$")

# timm's default preprocessing for the two families (their pretrained_cfg defaults), used when no config.json says
_IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
_DEFAULT_PRE = {"resnet": {**_IMAGENET, "crop_pct": 0.875, "interpolation": "bilinear"},  # torchvision's eval
                "vit": {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9, "interpolation": "bicubic"}}

# tensors (by a part of their name) of timm features lamina's families do not compute, and what to call them
_VIT_REFUSED = (("reg_token", "register tokens (reg_token)"), ("dist_token", "a distillation token (DeiT distilled)"),
                ("head_dist", "a distillation head (DeiT distilled)"), (".ls1.", "layer scale (ls1/ls2, DeiT III)"),
                (".q_norm.", "qk-norm (attn.q_norm/k_norm)"), ("norm_pre.", "a pre-norm (norm_pre, CLIP-style)"),
                ("fc_norm.", "a norm after pooling (fc_norm, average-pooled ViTs)"),
                ("attn_pool.", "an attention-pool head (attn_pool)"), ("patch_embed.norm.", "a patch-embed norm"),
                ("mlp.fc1_g.", "a gated MLP (SwiGLU)"), ("mlp.norm.", "a norm inside the MLP"))
_RESNET_REFUSED = (("conv1.0.", "a deep stem (resnet*c/d: three 3x3 convs)"),
                   ("downsample.2.", "avg-pool shortcuts (resnet*d)"), (".se.", "squeeze-excitation blocks (seresnet)"),
                   (".aa.", "anti-aliased downsampling (resnet*_aa)"))


def split_source(source: str) -> tuple[str | None, Path]:
    """'ARCH:PATH' or 'PATH' (after 'timm:') -> (timm architecture name or None, path)."""
    head, sep, tail = source.partition(":")
    if sep and _ARCH.match(head) and not Path(source).exists():
        return head, Path(tail)
    return None, Path(source)


def _read_config(folder: Path) -> dict | None:
    from lamina.hub.hf import _read_json

    path = folder / "config.json"
    return _read_json(path) if path.is_file() else None


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], list[str], dict | None]:
    """(state dict, file names, config.json or None) of a timm folder or a single weights file."""
    config = None
    if path.is_dir():
        config = _read_config(path)
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"hub: timm:{path}: no model.safetensors or pytorch_model.bin in the folder "
                                  "(timm's Hugging Face layout: config.json + model.safetensors)")
    if not path.is_file():
        raise CheckpointError(f"hub: timm:{path}: no such file or folder; give timm:<folder with config.json + "
                              "model.safetensors> or timm:<file.safetensors|.pth|.bin>")
    if path.suffix == ".safetensors":
        from lamina.io import load_state, state_shapes

        state_shapes(path)  # the header, checked: one CheckpointError line for a file that is not safetensors
        state = load_state(path)
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        from lamina.hub.torchfile import _read, _unwrap

        state = _unwrap(_read(path), path)
    else:
        raise CheckpointError(f"hub: timm:{path}: unknown weights format {path.suffix!r}; accepted: a folder, "
                              ".safetensors, .pth/.pt/.bin/.ckpt")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point()
           and not k.endswith("num_batches_tracked")]
    if bad:
        raise CheckpointError(f"hub: timm:{path}: {len(bad)} tensors are not floating point: {sorted(bad)[:5]}")
    return state, [path.name], config


def _refuse(state: dict, table, what: str, source: str) -> None:
    for part, feature in table:
        hit = next((k for k in state if part in f".{k}"), None)
        if hit is not None:
            raise CheckpointError(f"hub: {source}: {feature} ({hit}) is not supported by lamina's {what}; "
                                  f"accepted: plain timm/torchvision {what} weights")


def _shape(state: dict, key: str, ndim: int, source: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"hub: {source}: {key} is missing; not a timm/torchvision checkpoint of this family")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"hub: {source}: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


# ----- ResNet --------------------------------------------------------------------------------------------------
def _resnet_spec(state: dict, source: str) -> dict:
    """lamina resnet factory options read from a timm/torchvision ResNet state dict's shapes."""
    _refuse(state, _RESNET_REFUSED, "ResNet", source)
    stem = _shape(state, "conv1.weight", 4, source)
    if stem[2:] != (7, 7):
        raise CheckpointError(f"hub: {source}: conv1.weight {stem} is not a 7x7 stem; accepted: timm/torchvision "
                              "ResNets (resnet18/34/50/101/152)")
    blocks: dict[int, set[int]] = {}
    for k in state:
        m = re.match(r"layer(\d+)\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise CheckpointError(f"hub: {source}: expected stages layer1, layer2, ... got {sorted(blocks) or 'none'}")
    layers = []
    for i in sorted(blocks):
        if sorted(blocks[i]) != list(range(len(blocks[i]))):
            raise CheckpointError(f"hub: {source}: layer{i} blocks are not numbered 0..n-1: {sorted(blocks[i])}")
        layers.append(len(blocks[i]))
    bottleneck = "layer1.0.conv3.weight" in state
    widths = []
    for i in range(1, len(layers) + 1):
        c1 = _shape(state, f"layer{i}.0.conv1.weight", 4, source)
        c2 = _shape(state, f"layer{i}.0.conv2.weight", 4, source)
        planes = c1[0]
        if bottleneck:
            c3 = _shape(state, f"layer{i}.0.conv3.weight", 4, source)
            if c2[1] != c2[0] or c3[0] != 4 * planes or c2[0] != planes:
                raise CheckpointError(f"hub: {source}: layer{i} has grouped or wide bottlenecks (conv1 {c1}, conv2 "
                                      f"{c2}, conv3 {c3}; ResNeXt / wide_resnet), which lamina's resnet does not "
                                      "build; accepted: plain bottlenecks (out = 4 x planes)")
        widths.append(planes)
    if stem[0] != widths[0]:
        raise CheckpointError(f"hub: {source}: stem width {stem[0]} differs from layer1's {widths[0]}; lamina's "
                              "resnet ties them")
    fc = tuple(state["fc.weight"].shape) if "fc.weight" in state else None
    return {"name": "resnet50" if bottleneck else "resnet18", "layers": tuple(layers), "widths": tuple(widths),
            "block": "bottleneck" if bottleneck else "basic", "in_chans": stem[1],
            "num_classes": fc[0] if fc else 0}


def _resnet_rename(key: str) -> str:
    if key.startswith("conv1."):
        return "stem.0." + key[6:]
    if key.startswith("bn1."):
        return "stem.1." + key[4:]
    m = re.match(r"layer(\d+)\.(.*)", key)
    return f"stages.{int(m.group(1)) - 1}.{m.group(2)}" if m else key


def _resnet_timm_name(key: str) -> str:
    if key.startswith("stem.0."):
        return "conv1." + key[7:]
    if key.startswith("stem.1."):
        return "bn1." + key[7:]
    m = re.match(r"stages\.(\d+)\.(.*)", key)
    return f"layer{int(m.group(1)) + 1}.{m.group(2)}" if m else key


# ----- ViT -----------------------------------------------------------------------------------------------------
_VIT_PARTS = ((".norm1.", ".ln_1."), (".norm2.", ".ln_2."), (".attn.proj.", ".attn.out_proj."),
              (".mlp.fc1.", ".mlp.fc."), (".mlp.fc2.", ".mlp.out_proj."))


def _vit_spec(state: dict, arch: str | None, config: dict | None, source: str, heads=None) -> dict:
    """lamina vit factory options read from a timm ViT state dict's shapes (+ the head count, see the docstring)."""
    _refuse(state, _VIT_REFUSED, "ViT", source)
    args = (config or {}).get("model_args") or {}
    if not isinstance(args, dict):
        raise CheckpointError(f"hub: {source}: config.json model_args must be an object, got {type(args).__name__}")
    for key, ok, what in (("reg_tokens", lambda v: not v, "register tokens"),
                          ("no_embed_class", lambda v: not v, "pos_embed without the class token"),
                          ("pre_norm", lambda v: not v, "a pre-norm"), ("qk_norm", lambda v: not v, "qk-norm"),
                          ("init_values", lambda v: v is None, "layer scale"),
                          ("act_layer", lambda v: v in (None, "gelu"), "an activation other than GELU"),
                          ("global_pool", lambda v: v in (None, "token", "avg"), "this pooling")):
        if key in args and not ok(args[key]):
            raise CheckpointError(f"hub: {source}: config.json model_args {key}={args[key]!r}: {what} is not "
                                  "supported by lamina's ViT")
    D, C, ph, pw = _shape(state, "patch_embed.proj.weight", 4, source)
    if ph != pw:
        raise CheckpointError(f"hub: {source}: non-square patches {ph}x{pw}; lamina's ViT takes square ones")
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in state:
        depth += 1
    if depth == 0:
        raise CheckpointError(f"hub: {source}: no blocks.0.attn.qkv.weight; not a timm ViT (fused qkv) checkpoint")
    if "blocks.0.attn.qkv.bias" not in state and "blocks.0.attn.proj.bias" in state:
        raise CheckpointError(f"hub: {source}: qkv without bias (qkv_bias=False) is not supported by lamina's ViT "
                              "(its projections have biases together or not at all)")
    hidden = _shape(state, "blocks.0.mlp.fc1.weight", 2, source)[0]
    if int(D * (hidden / D)) != hidden:  # lamina builds int(D * mlp_ratio) hidden units
        raise CheckpointError(f"hub: {source}: MLP width {hidden} is not int({D} x ratio) for any float ratio")
    cls = "cls_token" in state
    pool = (args.get("global_pool") or ("token" if cls else "avg"))
    if cls and pool == "avg":
        raise CheckpointError(f"hub: {source}: average pooling beside a class token is not supported by lamina's "
                              "ViT (its mean pooling has no class token)")
    n_pos = _shape(state, "pos_embed", 3, source)[1]
    grid = math.isqrt(max(n_pos - cls, 0))
    if grid * grid != n_pos - cls or grid == 0:
        if cls and math.isqrt(n_pos) ** 2 == n_pos:
            raise CheckpointError(f"hub: {source}: pos_embed without the class token (no_embed_class) is not "
                                  "supported by lamina's ViT")
        raise CheckpointError(f"hub: {source}: pos_embed has {n_pos} positions, not a square grid"
                              f"{' plus the class token' if cls else ''}")
    heads = heads if heads is not None else args.get("num_heads")
    name = arch or (config or {}).get("architecture")
    m = _VIT_NAME.match(name or "")
    if heads is None and m:
        heads = _VIT_HEADS[m.group(1)]
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or D % heads:
        shown = f"{heads!r} heads do not divide width {D}" if heads is not None else "the head count is unknown"
        raise CheckpointError(f"hub: {source}: {shown}; give the timm name, e.g. timm:vit_small_patch16_224:PATH, "
                              "or a folder whose config.json has it")
    head = tuple(state["head.weight"].shape) if "head.weight" in state else None
    return {"name": "vit_tiny", "img_size": grid * ph, "patch_size": ph, "in_chans": C, "embed_dim": D,
            "depth": depth, "n_head": heads, "mlp_ratio": hidden / D, "pool": "cls" if cls else "mean",
            "num_classes": head[0] if head else 0}


def _vit_convert(state: dict, known) -> dict[str, torch.Tensor]:
    """timm names -> lamina names; each fused qkv split in thirds (q, k, v) along dim 0. A name lamina does not
    know stays as it is, so errors show the file's own names."""
    out = {}
    for key, value in state.items():
        m = re.match(r"(blocks\.\d+\.attn)\.qkv\.(weight|bias)$", key)
        if m and value.shape[0] % 3 == 0 and f"{m.group(1)}.q_proj.{m.group(2)}" in known:
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[f"{m.group(1)}.{part}_proj.{m.group(2)}"] = chunk
            continue
        new = key
        for old, ours in _VIT_PARTS:
            new = new.replace(old, ours)
        out[new if new in known else key] = value
    return out


def _vit_timm_name(key: str) -> str:
    key = re.sub(r"\.attn\.[qkv]_proj\.", ".attn.qkv.", key)
    for old, new in _VIT_PARTS:
        key = key.replace(new, old)
    return key


def resample_pos_embed(pos: torch.Tensor, prefix: int, new_grid: int) -> torch.Tensor:
    """(1, P + g*g, D) -> (1, P + new_grid^2, D): the grid resized bicubically with antialias (timm's
    resample_abs_pos_embed, applied when a checkpoint meets another image size); prefix tokens kept."""
    old = math.isqrt(pos.shape[1] - prefix)
    if old == new_grid:
        return pos
    D = pos.shape[-1]
    grid = pos[:, prefix:].float().reshape(1, old, old, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos.dtype)
    return torch.cat([pos[:, :prefix], grid], dim=1)


# ----- loading ---------------------------------------------------------------------------------------------------
def _preprocess(family: str, config: dict | None, crop: int | None, source: str, default_crop: int) -> dict:
    cfg = (config or {}).get("pretrained_cfg") or {}
    if not isinstance(cfg, dict):
        raise CheckpointError(f"hub: {source}: config.json pretrained_cfg must be an object")
    pre = {**_DEFAULT_PRE[family], **{k: cfg[k] for k in ("mean", "std", "crop_pct", "interpolation") if k in cfg}}
    for k in ("mean", "std"):
        v = pre[k]
        if not (isinstance(v, (list, tuple)) and len(v) in (1, 3) and all(isinstance(x, (int, float)) for x in v)
                and (k == "mean" or all(x > 0 for x in v))):
            raise CheckpointError(f"hub: {source}: config.json pretrained_cfg.{k} must be 3 numbers, got {v!r}")
    size = cfg.get("input_size")
    if crop is None:
        crop = size[-1] if isinstance(size, (list, tuple)) and size and isinstance(size[-1], int) else default_crop
    pct = pre["crop_pct"]
    if not isinstance(pct, (int, float)) or not 0 < pct <= 1:
        raise CheckpointError(f"hub: {source}: config.json pretrained_cfg.crop_pct must be in (0, 1], got {pct!r}")
    mode = pre["interpolation"] if pre["interpolation"] in ("bilinear", "bicubic") else "bilinear"
    return {"resize": math.floor(crop / pct), "crop": int(crop), "mean": [float(x) for x in pre["mean"]],
            "std": [float(x) for x in pre["std"]], "interpolation": mode}


def load_timm(source: str, num_classes: int | None = None, img_size: int | None = None, **options):
    """(model in eval mode, info) for 'PATH' or 'ARCH:PATH' (what follows 'timm:'); see the module docstring."""
    from lamina.io import load_state_strict
    from lamina.models.registry import create_model

    arch, path = split_source(source)
    where = f"timm:{source}"
    state, files, config = _read_tensors(path)
    if config is not None and arch is None:
        arch = config.get("architecture") if isinstance(config.get("architecture"), str) else None
    if "patch_embed.proj.weight" in state or (arch or "").startswith(("vit_", "deit_")):
        family, spec = "vit", _vit_spec(state, arch, config, where, options.get("n_head"))
        convert, timm_name, head = _vit_convert, _vit_timm_name, "head."
    elif "conv1.weight" in state or "layer1.0.conv1.weight" in state or (arch or "").startswith("resnet"):
        family, spec = "resnet", _resnet_spec(state, where)
        timm_name, head = _resnet_timm_name, "fc."

        def convert(sd, known):  # a name lamina does not know stays as it is: errors show the file's names
            return {(_resnet_rename(k) if _resnet_rename(k) in known else k): v for k, v in sd.items()}
    else:
        raise CheckpointError(f"hub: {where}: neither a timm ResNet (conv1, layer1...) nor a ViT (patch_embed, "
                              f"blocks...) checkpoint; first tensors: {sorted(state)[:4]}")
    declared = (config or {}).get("num_classes")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared != spec["num_classes"]:
        raise CheckpointError(f"hub: {where}: config.json says num_classes={declared} but the head has "
                              f"{spec['num_classes']} outputs")
    file_classes = spec["num_classes"]
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise CheckpointError(f"hub: {where}: num_classes must be an integer >= 0, got {num_classes!r}")
        spec["num_classes"] = num_classes
    head_note = "loaded" if file_classes == spec["num_classes"] else (
        f"re-initialised: {spec['num_classes']} classes (the file's head has {file_classes})"
        if spec["num_classes"] else f"removed (the file's head has {file_classes} classes)")
    if family == "vit" and img_size is not None and img_size != spec["img_size"]:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1 or img_size % spec["patch_size"]:
            raise CheckpointError(f"hub: {where}: img_size must be a positive multiple of the patch size "
                                  f"({spec['patch_size']}), got {img_size!r}")
    elif img_size is not None and family == "resnet":
        raise CheckpointError(f"hub: {where}: img_size is a ViT option; a ResNet takes any input size")
    grid = spec["img_size"] // spec["patch_size"] if family == "vit" else None
    if img_size is not None and family == "vit":
        spec["img_size"] = img_size
    name = spec.pop("name")
    factory = {**spec, **options}
    # the structure was read from the names: a file listing many blocks with tiny tensors must not make a huge
    # model, so build on the meta device first (no memory) and compare with what the file holds
    with torch.device("meta"):
        known = create_model(name, **factory).state_dict()
    converted = convert(state, known)
    if head_note != "loaded":
        converted = {k: v for k, v in converted.items() if not k.startswith(head)}
    own = lambda k: not k.startswith(head) and k != "pos_embed"  # the head and the grid may be new
    built = sum(t.numel() for k, t in known.items() if own(k))
    held = sum(t.numel() for k, t in converted.items() if own(k))
    if built > 2 * held + 16_000_000:
        raise CheckpointError(f"hub: {where}: the names describe a model of {built:,} values but the file holds "
                              f"{held:,}; not a consistent timm {family} checkpoint")
    pos_note = None
    if family == "vit" and grid != factory["img_size"] // factory["patch_size"]:
        new = factory["img_size"] // factory["patch_size"]
        converted["pos_embed"] = resample_pos_embed(converted["pos_embed"], int(spec["pool"] == "cls"), new)
        pos_note = f"resampled {grid}x{grid} -> {new}x{new} (bicubic, antialias)"
    del known
    model = create_model(name, **factory)
    optional = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
    if head_note != "loaded":
        optional += [k for k in model.state_dict() if k.startswith(head)]
    load_state_strict(model, converted, f"hub: {where}:", limit=5, optional=optional, show_missing=timm_name,
                      labels={"head": f"does not fit a timm {family} ({name} layout)", "unexpected": "{n} unmatched "
                              "in file", "missing": "{n} missing from file", "shape": "{n} shape mismatches"})
    model.eval()
    info = {"format": "timm", "family": family, "architecture": arch, "path": str(path), "files": files,
            "factory": {"name": name, **factory}, "tensors": len(state), "head": head_note,
            "preprocess": _preprocess(family, config, img_size, where, factory.get("img_size", 224)), "config": config}
    if pos_note:
        info["pos_embed"] = pos_note
    return model, info


__all__ = ["load_timm", "resample_pos_embed", "split_source"]
