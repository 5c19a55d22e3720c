"""GGUF files (llama.cpp's format) mapped onto lamina's Llama, every tensor dequantized to fp32 and checked.

    model, info = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    info == {"format": "gguf", "family": "llama", "config": {...hyperparameters read...}, "tokenizer": <HF tokenizer>,
             "chat_template": "...", "bos_id": 1, "eos_id": 2, "file_type": 3, "path": "..."}

The file is read with the `gguf` package (GGUFReader) and each tensor dequantized with gguf.quants.dequantize.
Names: GGUF's names come from the gguf package's own HF -> GGUF table (gguf.get_tensor_name_map), applied to
lamina's HF key map (lamina.models.llama.hf_llama_key_map), so this file holds no third copy of them. Strict: a
GGUF tensor with no place in the model, a model tensor the file lacks, or a shape that disagrees with the
metadata is a CheckpointError naming them.

RoPE layout: llama.cpp's converter permutes the rows of attn_q / attn_k from HF's rotate-half layout into its
interleaved (GPT-J style) one, per head: HF row (i, half h, j) -> GGUF row (i, j, h). It is undone here
(transformers' LlamaTensorProcessor._reverse_permute_weights), after which the tensors are exactly what HF and
lamina's rotate-half RotaryEmbedding expect.

The tokenizer is rebuilt from the metadata (tokenizer.ggml.*) by transformers' GGUF converter, imported lazily
(transformers is an optional dependency); with tokenizer=False or without transformers, info["tokenizer"] is None.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lamina.errors import CheckpointError, MissingDependencyError
from lamina.io import check_state, load_state_strict

_OPTIONS = ("dtype", "block_size", "tokenizer", "progress")


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: (n_head, head_dim/2, 2, C) -> (n_head, 2, head_dim/2, C)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"hub: gguf: a q/k projection with {rows} rows does not split into {n_head} heads "
                              "of an even size")
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _llama_config(reader, path, block_size):
    """(LlamaConfig, hyperparameters) from the metadata; a value of the wrong type, a layer count the tensors do
    not have, or a context length past lamina.hub.MAX_CONTEXT is one CheckpointError line, before anything is built."""
    from lamina.errors import ModelError

    try:
        return _llama_config_checked(reader, path, block_size)
    except CheckpointError:
        raise
    except (TypeError, ValueError, ArithmeticError, ModelError) as e:  # e.g. a string where a count belongs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"hub: {path}: GGUF metadata does not describe a Llama lamina builds ({first})") from None


def _number(value, key: str, path, kind=int):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CheckpointError(f"hub: {path}: GGUF metadata {key} must be a number, got {value!r:.60}")
    return kind(value)


def _llama_config_checked(reader, path, block_size):
    from lamina.hub import check_context
    from lamina.models.llama import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"hub: {path}: GGUF architecture {arch!r} is not supported; accepted: llama")

    def need(key):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise CheckpointError(f"hub: {path}: GGUF metadata lacks llama.{key}, which a Llama config needs")
        return _number(value, f"llama.{key}", path, float if key.endswith("epsilon") else int)

    def opt(key, default, kind=int):
        value = _field(reader, f"llama.{key}")
        return default if value is None else _number(value, f"llama.{key}", path, kind)

    n_embd, n_head = need("embedding_length"), need("attention.head_count")
    if n_head <= 0 or n_embd <= 0:
        raise CheckpointError(f"hub: {path}: GGUF metadata embedding_length {n_embd} / head_count {n_head} must be "
                              "positive")
    n_kv = opt("attention.head_count_kv", n_head)
    # the layer count drives loops and name tables: it must be the number of blocks the file holds tensors for
    n_layer = need("block_count")
    blocks = {int(t.name.split(".")[1]) for t in reader.tensors
              if t.name.startswith("blk.") and t.name.split(".")[1].isdigit()}
    if len(blocks) != n_layer or (blocks and max(blocks) != n_layer - 1):  # never range(n_layer): n_layer is untrusted
        raise CheckpointError(f"hub: {path}: GGUF metadata llama.block_count is {n_layer} but the file holds "
                              f"tensors for {len(blocks)} block(s): the metadata does not match the weights")
    rope_dim = _field(reader, "llama.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != n_embd // n_head:
        raise CheckpointError(f"hub: {path}: partial rotary embeddings (rope.dimension_count {rope_dim} != head "
                              f"size {n_embd // n_head}) are not supported")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise CheckpointError(f"hub: {path}: RoPE scaling is not supported; only the default rotary embedding")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise CheckpointError(f"hub: {path}: GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")
    ctx = opt("context_length", 2048)
    if block_size is not None:
        check_context(block_size, "block_size", path)
    else:
        check_context(ctx, "GGUF llama.context_length", path)
    tied = not any(t.name == "output.weight" for t in reader.tensors)  # llama.cpp omits output.weight when tied
    hp = {
        "vocab_size": _number(vocab, "llama.vocab_size", path), "block_size": int(block_size or ctx),
        "n_layer": n_layer, "n_head": n_head, "n_kv_head": n_kv, "n_embd": n_embd,
        "ffn_hidden": need("feed_forward_length"), "rope_base": opt("rope.freq_base", 10000.0, float),
        "norm_eps": need("attention.layer_norm_rms_epsilon"), "tie_weights": tied,
    }
    return LlamaConfig(**hp), {**hp, "context_length": ctx}


def read_llama_state(reader, cfg, path, progress=None) -> dict[str, torch.Tensor]:
    """lamina Llama state (name -> fp32 tensor) from a GGUFReader, every name and shape checked; `progress(done,
    total)` counts the tensors dequantized."""
    import gguf

    from lamina.models.llama import hf_llama_key_map

    key_map = hf_llama_key_map(cfg.n_layer)  # HF name -> lamina name
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    to_lamina = {}
    for hf, ours in key_map.items():
        g = table.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise CheckpointError(f"hub: gguf: the gguf package has no GGUF name for {hf}")
        to_lamina[g] = (hf, ours)
    tied = {"lm_head.weight"} if cfg.tie_weights else set()
    from lamina.models.llama import Llama

    from lamina.hub import check_built_size

    with torch.device("meta"):
        meta_model = Llama(cfg)
        expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    q_k = {f"blocks.{i}.attn.{p}_proj.weight": (cfg.n_head if p == "q" else cfg.n_kv_head)
           for i in range(cfg.n_layer) for p in "qk"}
    # every name and shape checked from the header, before anything is dequantized
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # GGUF: innermost first
    check_state(expected, shapes, f"hub: {path}", {g: ours for g, (_, ours) in to_lamina.items() if ours not in tied},
                optional=tied, labels={
                    "head": "", "unexpected": "{n} tensor(s) with no place in lamina's llama",
                    "missing": "{n} model tensor(s) not in the file", "shape": "{n} shape mismatch(es)",
                    "shape_entry": "{key} {got} (lamina's {name} expects {want})"})
    check_built_size(meta_model, sum(math.prod(s) for s in shapes.values()), str(path))  # RoPE tables included
    del meta_model
    state = {}
    if progress is not None:
        progress(0, len(reader.tensors))
    for t in reader.tensors:
        ours = to_lamina[t.name][1]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shapes[t.name])
        if ours in q_k:
            w = unpermute_rope_rows(w, q_k[ours])
        state[ours] = torch.from_numpy(np.array(w, copy=True))
        if progress is not None:
            progress(len(state), len(reader.tensors))
    return state


def gguf_tokenizer(path: Path):
    """A transformers fast tokenizer rebuilt from the file's tokenizer.ggml.* metadata (needs transformers)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingDependencyError("hub: building a tokenizer from GGUF metadata needs transformers "
                                     "(pip install transformers); or pass tokenizer=False") from None
    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_gguf(path: str | Path, **options):
    """(model, info) for a GGUF file; see the module docstring. Options: dtype (a torch dtype, default fp32),
    block_size (context length to build RoPE tables and KV caches for; default the file's context_length),
    tokenizer (True: build it, needs transformers; False: skip; default True when transformers is installed),
    progress (progress(done, total): the tensors dequantized, then the tokenizer as one more step)."""
    path = Path(path)
    unknown_opts = set(options) - set(_OPTIONS)
    if unknown_opts:
        raise CheckpointError(f"hub: unknown option(s) {', '.join(sorted(unknown_opts))} for a GGUF file; "
                              f"accepted: {', '.join(_OPTIONS)}")
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("hub: reading GGUF files needs the gguf package (pip install gguf)") from None
    if not path.is_file():
        raise CheckpointError(f"hub: {path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt/unsupported file
        raise CheckpointError(f"hub: {path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    from lamina.models.llama import Llama

    cfg, hp = _llama_config(reader, path, options.get("block_size"))
    progress = options.get("progress")
    steps = len(reader.tensors) + 1  # + the tokenizer, built from the file's metadata (seconds with transformers)
    counted = None if progress is None else (lambda done, _: progress(done, steps))
    state = read_llama_state(reader, cfg, path, counted)
    model = Llama(cfg)
    model.model_name = "llama"
    load_state_strict(model, state, f"hub: {path}")  # checked above; a tied lm_head is wte, loaded with it
    if options.get("dtype") is not None:
        model = model.to(options["dtype"])
    model.eval()

    want_tok = options.get("tokenizer")
    tok = None
    if want_tok or want_tok is None:
        try:
            tok = gguf_tokenizer(path)
        except MissingDependencyError:
            if want_tok:
                raise
    if progress is not None:
        progress(steps, steps)
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    info = {"format": "gguf", "family": "llama", "config": hp, "tokenizer": tok,
            "chat_template": _field(reader, "tokenizer.chat_template"),
            "bos_id": None if bos is None else int(bos), "eos_id": None if eos is None else int(eos),
            "file_type": _field(reader, "general.file_type"), "name": _field(reader, "general.name"),
            "path": str(path)}
    return model, info


__all__ = ["gguf_tokenizer", "load_gguf", "read_llama_state", "unpermute_rope_rows"]
