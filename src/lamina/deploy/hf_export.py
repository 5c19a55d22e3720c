"""A trained run out as a Hugging Face-layout folder (`--format hf`) or a PEFT LoRA adapter (`--format peft`).

    export_hf_run("runs/shakespeare-char-gpt")          # -> runs/shakespeare-char-gpt/export/hf/
    export_peft_run("runs/lora-run")                    # -> runs/lora-run/export/peft/ (+ base/ the frozen base)

The HF folder: config.json and model.safetensors (lamina.hub.hf_write), generation_config.json for causal LMs and
T5, the run's tokenizer as tokenizer.json + tokenizer_config.json (a character LM gets an equivalent `tokenizers`
WordLevel tokenizer, so `AutoTokenizer` gives the run's ids), preprocessor_config.json for image classifiers (a
ViTImageProcessor giving lamina's model input from raw pixels: size, 1/pixel_max, the run's normalize), and
README.md, a model card with YAML front matter and the run's metrics and data from summary.json. The PEFT folder: adapter_config.json + adapter_model.safetensors, the
same tokenizer and card, and base/, the frozen base model as an HF folder, for
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out)`.

Every export is checked before it is reported: the folder is read back through lamina.hub.load_hf_folder, and,
when transformers (and peft) are installed, through `transformers` itself; the max abs logit differences against
the run's model on the run's own data (token ids; T5: source + decoder ids, and greedy generation's tokens; images:
test images, and what AutoImageProcessor makes of them raw) go into the result (and export.json beside the folder).
A model family or option HF cannot represent is one ModelError line (exit 2), naming it and what is supported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
from pathlib import Path

import torch

from lamina.errors import ConfigError, ModelError
from lamina.io import atomic_write_text, publish_folder, write_folder

HF_FORMATS = ("hf", "peft")
PEFT_FAMILIES = ("gpt2", "llama", "bert")  # families whose PEFT adapters are written and checked against peft
_PIPELINE = {"GPT2LMHeadModel": "text-generation", "LlamaForCausalLM": "text-generation",
             "BertForMaskedLM": "fill-mask", "BertForSequenceClassification": "text-classification",
             "BertForQuestionAnswering": "question-answering", "BertModel": "feature-extraction",
             "T5ForConditionalGeneration": "text2text-generation", "ViTForImageClassification": "image-classification",
             "ResNetForImageClassification": "image-classification"}
_AUTO = {"GPT2LMHeadModel": "AutoModelForCausalLM", "LlamaForCausalLM": "AutoModelForCausalLM",
         "BertForMaskedLM": "AutoModelForMaskedLM", "BertForSequenceClassification": "AutoModelForSequenceClassification",
         "BertForQuestionAnswering": "AutoModelForQuestionAnswering", "BertModel": "AutoModel",
         "T5ForConditionalGeneration": "AutoModelForSeq2SeqLM", "ViTForImageClassification":
         "AutoModelForImageClassification", "ResNetForImageClassification": "AutoModelForImageClassification"}
_CLASSIFIERS = ("BertForSequenceClassification", "ViTForImageClassification", "ResNetForImageClassification")
PROBE_IMAGES = 8  # test images the parity check runs through both models


def _yaml_str(s) -> str:
    return json.dumps(str(s))  # a JSON string is a valid YAML scalar, whatever it holds


def model_card(run, spec, fmt: str, parity: dict) -> str:
    """README.md: YAML front matter (library_name, tags, datasets, base_model, pipeline_tag) + the run's metrics,
    data and model from summary.json / data.json."""
    summary = {}
    if run.folder.summary.is_file():
        try:
            summary = json.loads(run.folder.summary.read_text())
        except (OSError, ValueError):
            summary = {}
    facts, cfg = run.facts, run.cfg
    lib = "peft" if fmt == "peft" else "transformers"
    tags = ["lamina", spec.family, _PIPELINE[spec.architecture]] + (["lora"] if fmt == "peft" else [])
    front = [f"library_name: {lib}", "tags:", *[f"- {_yaml_str(t)}" for t in tags], "datasets:",
             f"- {_yaml_str(facts.name)}", f"pipeline_tag: {_PIPELINE[spec.architecture]}"]
    source = cfg.model.pretrained
    if source and not Path(source).exists():  # a name (weights package, hub id); a local path means nothing elsewhere
        front.append(f"base_model: {_yaml_str(source)}")
    lines = ["---", *front, "---", "", f"# {run.folder.path.name}", "",
             f"A {spec.architecture} ({'LoRA adapter, ' if fmt == 'peft' else ''}exported by `lamina export "
             f"--format {fmt}`) of lamina's `{cfg.model.name}` trained on `{facts.name}` ({facts.task})"
             + (f", starting from `{source}`." if source else "."), ""]
    lines += ["## Data", "", f"- data set: `{facts.name}`; task: `{facts.task}`",
              f"- samples or tokens: train {facts.train:,}, val {facts.val:,}, test {facts.test:,}", ""]
    metrics = {**{k: v for k, v in (summary.get("final") or {}).items() if k.startswith("val/")},
               **(summary.get("test") or {})}
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
                  if isinstance(v, (int, float))]
        lines.append("")
    train = [f"{k}: {summary[k]:,}" if isinstance(summary[k], int) else f"{k}: {summary[k]:.4g}"
             for k in ("params", "epochs", "steps", "best_epoch", "train_time_s", "trainable_fraction")
             if isinstance(summary.get(k), (int, float))]
    if train:
        lines += ["## Training", "", *[f"- {t}" for t in train], ""]
    lines += ["## Parity", "", "Max abs logit difference against the lamina model at export:", ""]
    lines += [f"- {k.removesuffix('_max_abs_diff')}: {v:.3g}" for k, v in parity.items() if isinstance(v, float)]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in parity.items() if isinstance(v, int)]
    auto = _AUTO[spec.architecture]
    pre = ("AutoImageProcessor", "processor") if spec.inputs == "images" else ("AutoTokenizer", "tok")
    load = (f"model = {auto}.from_pretrained(\"path/to/this/folder\")" if fmt == "hf" else
            f"base = {auto}.from_pretrained(\"path/to/this/folder/base\")\n"
            "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")")
    imports = f"from transformers import {pre[0]}, {auto}" + ("\nfrom peft import PeftModel" if fmt == "peft" else "")
    lines += ["", "## Use", "", "```python", imports, load,
              f"{pre[1]} = {pre[0]}.from_pretrained(\"path/to/this/folder\")", "```", ""]
    return "\n".join(lines)


def _label_names(spec, facts) -> None:
    """A classifier's config.json names its classes (id2label / label2id), as HF pipelines print them."""
    names = facts.class_names
    if spec.architecture in _CLASSIFIERS and names and len(names) == len(spec.config["id2label"]):
        spec.config["id2label"] = {str(i): str(n) for i, n in enumerate(names)}
        spec.config["label2id"] = {str(n): i for i, n in enumerate(names)}


def _tokenizer_files(run, spec) -> dict[str, str]:
    from lamina.hub.hf_write import hf_tokenizer_files

    tok = run.folder.tokenizer.read_text() if run.folder.tokenizer.is_file() else None
    vocab = run.facts.meta.get("vocab") if tok is None else None
    if vocab is not None and not (isinstance(vocab, list) and all(isinstance(c, str) and len(c) == 1 for c in vocab)):
        vocab = None  # not a character vocabulary: no tokenizer to export
    if spec.inputs == "images":
        return {}
    return hf_tokenizer_files(tok, vocab, block_size=run.model.block_size, bert=spec.family == "bert",
                              seq2seq=spec.inputs == "seq2seq")


def _special_ids(files: dict[str, str]) -> dict[str, int]:
    """{"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...} for the tokenizer's specials it has."""
    special = json.loads(files.get("special_tokens_map.json", "{}"))
    if not files.get("tokenizer.json") or not special:
        return {}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files["tokenizer.json"])
    return {f"{role}_token_id": tok.token_to_id(special[f"{role}_token"]) for role in ("bos", "eos", "pad")
            if f"{role}_token" in special}


def _generation_config(files: dict[str, str], spec) -> dict[str, str]:
    """generation_config.json of a causal LM: its context length and the tokenizer's special ids; and the same
    ids into config.json (the families' defaults would name ordinary tokens of a lamina vocabulary)."""
    if spec.inputs == "seq2seq":  # T5: the model's own ids (the tokenizer's, as the run trained on them)
        c = spec.config
        gen = {"decoder_start_token_id": c["decoder_start_token_id"], "eos_token_id": c["eos_token_id"],
               "pad_token_id": c["pad_token_id"], "max_length": c["n_positions"]}
        return {"generation_config.json": json.dumps(gen, indent=2) + "\n"}
    ids = _special_ids(files)
    spec.config.update(ids)
    if not spec.causal:
        return {}
    gen = {"max_length": spec.config.get("n_positions") or spec.config.get("max_position_embeddings"), **ids}
    return {"generation_config.json": json.dumps(gen, indent=2) + "\n"}


def _pixel_max(run) -> float:
    value = run.facts.meta.get("pixel_max")
    return float(value) if isinstance(value, (int, float)) and value > 0 else 255.0


def _preprocessor_files(run, spec) -> dict[str, str]:
    """preprocessor_config.json for an image classifier: transformers' ViTImageProcessor set up to give the tensor
    lamina's pipeline gives (resize to the training size, bilinear as lamina's image loader; pixels / pixel_max;
    the run's normalize step if it has one, else none), for ViT and ResNet alike (a plain resize-rescale-normalize
    processor; HF's ResNet checkpoints use ConvNext's, whose resize-and-crop lamina's training never did)."""
    from lamina.data.transforms import normalize_stats

    if spec.inputs != "images":
        return {}
    C, H, W = _image_shape(run, spec)
    stats = normalize_stats(run.cfg.data.augment)
    mean, std = stats if stats else ([0.0] * C, [1.0] * C)
    # float32 statistics shown as the numbers the config gave (0.3, not 0.30000001192092896)
    mean, std = ([float(f"{x:.7g}") for x in (list(v) * C if len(v) == 1 else v)] for v in (mean, std))
    pre = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": H, "width": W},
           "resample": 2, "do_rescale": True, "rescale_factor": 1.0 / _pixel_max(run),
           "do_normalize": stats is not None, "image_mean": mean, "image_std": std}
    return {"preprocessor_config.json": json.dumps(pre, indent=2) + "\n"}


def _image_shape(run, spec) -> tuple[int, int, int]:
    """(C, H, W) the run trained on (data facts), else what config.json says (ViT's image_size)."""
    shape = tuple(run.facts.input_shape)
    if len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape):
        return shape  # type: ignore[return-value]
    size = spec.config.get("image_size", 224)
    return spec.config["num_channels"], size, size


def _probe_ids(run, vocab_size: int, T: int) -> torch.Tensor:
    """(2, T) token ids for the parity check: the start of the run's own validation (else train) token stream for a
    language model, else ids drawn with a fixed seed from the non-special part of the vocabulary."""
    try:
        bundle = run.data()
        for split in ("val", "test", "train"):
            data = getattr(bundle, split, None)
            ids = data.tensors.get("ids") if data is not None else None
            if ids is not None and ids.dim() == 1 and len(ids) >= 2 * T:
                return ids[: 2 * T].reshape(2, T).long()
    except Exception:  # noqa: BLE001 - the data is not at hand on this machine: random ids still check the weights
        pass
    g = torch.Generator().manual_seed(0)
    return torch.randint(min(5, vocab_size - 1), vocab_size, (2, T), generator=g)


def _probe_pairs(run, model, T: int = 64) -> dict:
    """{"src", "tgt", "mask"} for a seq2seq parity check: the first 4 pairs of the run's validation (else test,
    train) split, the decoder input being <s> y without its last token; random ids when the data is not at hand."""
    try:
        bundle = run.data()
        for split in ("val", "test", "train"):
            data = getattr(bundle, split, None)
            t = data.tensors if data is not None else {}
            if "src" in t and "tgt" in t and len(t["src"]) >= 1:
                src, tgt = t["src"][:4, :T].long(), t["tgt"][:4, :T].long()
                return {"src": src, "tgt": tgt[:, :-1] if tgt.shape[1] > 1 else tgt, "mask": src != model.pad_id}
    except Exception:  # noqa: BLE001 - the data is not at hand on this machine: random ids still check the weights
        pass
    g = torch.Generator().manual_seed(0)
    lo = min(5, model.vocab_size - 1)
    src, tgt = (torch.randint(lo, model.vocab_size, (2, n), generator=g) for n in (T, min(T, model.block_size)))
    tgt[:, 0] = model.bos_id
    return {"src": src, "tgt": tgt, "mask": src != model.pad_id}


def _probe_images(run, spec) -> dict:
    """{"x": the model's input, "raw": the same images in pixel units before the run's normalize step, or None}:
    the first PROBE_IMAGES of the run's test (else val, train) split; random images when the data is not at hand."""
    from lamina.data.transforms import eval_transforms

    x = None
    try:
        bundle = run.data()
        for split in ("test", "val", "train"):
            data = getattr(bundle, split, None)
            t = data.tensors if data is not None else {}
            if "x" in t and t["x"].dim() == 4:
                x = t["x"][:PROBE_IMAGES].float()
                break
    except Exception:  # noqa: BLE001 - the data is not at hand on this machine: random images still check the weights
        pass
    if x is None:
        x = torch.rand((PROBE_IMAGES, *_image_shape(run, spec)), generator=torch.Generator().manual_seed(0))
    raw = x * _pixel_max(run)
    raw = raw.round() if (raw - raw.round()).abs().max() < 1e-4 and raw.max() <= 255 else None  # integer pixels
    prep = eval_transforms(run.cfg.data.augment)
    return {"x": prep({"x": x})["x"] if prep is not None else x, "raw": raw}


def _probe(run, model, spec) -> dict:
    """The inputs the parity check feeds both models, by what the HF model takes."""
    if spec.inputs == "images":
        return _probe_images(run, spec)
    if spec.inputs == "seq2seq":
        return _probe_pairs(run, model)
    return {"ids": _probe_ids(run, model.vocab_size, min(model.block_size, 64))}


def _probe_what(probe, spec) -> str:
    """The probe in words, for the CLI: '8x1x28x28 test images', '4x21 source + 4x17 decoder ids'."""
    shape = lambda t: "x".join(str(n) for n in t.shape)
    if spec.inputs == "images":
        return f"{shape(probe['x'])} images"
    if spec.inputs == "seq2seq":
        return f"{shape(probe['src'])} source + {shape(probe['tgt'])} decoder ids"
    return f"{shape(probe['ids'])} token ids"


def _lamina_logits(model, spec, probe):
    with torch.no_grad():
        if spec.inputs == "images":
            return model(probe["x"]).float()
        if spec.inputs == "seq2seq":
            return model(probe["src"], probe["tgt"], probe["mask"]).float()
        return model(probe["ids"]).float()


def _hf_logits(hf, spec, probe):
    with torch.no_grad():
        if spec.inputs == "images":
            return hf(pixel_values=probe["x"]).logits.float()
        if spec.inputs == "seq2seq":
            return hf(input_ids=probe["src"], attention_mask=probe["mask"].long(),
                      decoder_input_ids=probe["tgt"]).logits.float()
        ids = probe["ids"]
        out = hf(input_ids=ids, attention_mask=torch.ones_like(ids))
    if spec.architecture == "BertForQuestionAnswering":
        return torch.stack([out.start_logits, out.end_logits], dim=-1).float()
    if spec.architecture == "BertModel":  # mean pooling over the (unpadded) tokens, as the lamina model pools
        return out.last_hidden_state.mean(dim=1).float()
    return out.logits.float()


def _transformers_model(spec, folder: Path):
    import transformers

    return getattr(transformers, _AUTO[spec.architecture]).from_pretrained(str(folder)).float().eval()


@contextlib.contextmanager
def _quiet_transformers():
    """Load reports go to stderr; parity is measured here, not assumed. The caller's verbosity comes back after."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on stderr
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _check_hf(model, spec, folder: Path, probe) -> dict:
    """Max abs logit differences of the folder, read back by lamina and by transformers (when installed); for T5
    also the greedy tokens (count of positions where transformers' generate and lamina's decoding differ), for
    images the pixels transformers' image processor makes of the raw images against lamina's model input."""
    from lamina.hub.hf import load_hf_folder

    want = _lamina_logits(model, spec, probe)
    back, _ = load_hf_folder(folder)
    out = {"lamina_roundtrip_max_abs_diff": (_lamina_logits(back.eval(), spec, probe) - want).abs().max().item()}
    if importlib.util.find_spec("transformers") is not None:
        with _quiet_transformers():
            hf = _transformers_model(spec, folder)
        out["transformers_max_abs_diff"] = (_hf_logits(hf, spec, probe) - want).abs().max().item()
        if spec.inputs == "seq2seq":
            out["transformers_greedy_token_mismatches"] = greedy_mismatches(model, hf, probe)
        if spec.inputs == "images" and probe["raw"] is not None:
            out["transformers_preprocessor_max_abs_diff"] = _preprocessor_diff(folder, probe)
    return out


def greedy_mismatches(model, hf, probe, max_new_tokens: int = 20) -> int:
    """Positions where transformers' greedy generate and lamina's greedy decoding (seq2seq_generate, beam 1) pick
    different tokens for the probe's sources (both right-padded with pad_id after </s>)."""
    from lamina.models.generation import seq2seq_generate

    n = min(max_new_tokens, model.block_size)
    src, mask = probe["src"], probe["mask"]
    # transformers 5.x sizes T5's generation cache by the encoder's layer count (num_layers): a decoder with more
    # layers indexes past it, so an asymmetric T5 generates without the cache there (same tokens, slower)
    cache = model.cfg.n_enc_layer == model.cfg.n_dec_layer
    with torch.no_grad(), _quiet_transformers():  # (generation_config's max_length beside max_new_tokens: a warning)
        ours = seq2seq_generate(model, src, mask, beam_size=1, max_len=n)
        theirs = hf.generate(input_ids=src, attention_mask=mask.long(), max_new_tokens=n, do_sample=False,
                             num_beams=1, use_cache=cache)[:, 1:]  # after the decoder start token
    width = max(ours.shape[1], theirs.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=model.pad_id)
    return int((pad(ours) != pad(theirs)).sum().item())


def _preprocessor_diff(folder: Path, probe) -> float:
    """Max abs difference between what AutoImageProcessor (the folder's preprocessor_config.json) makes of the raw
    probe images (uint8, channels first) and the input lamina's model got."""
    import numpy as np
    import transformers

    with _quiet_transformers():
        proc = transformers.AutoImageProcessor.from_pretrained(str(folder))
    images = [np.ascontiguousarray(r.numpy().astype(np.uint8)) for r in probe["raw"]]
    got = proc(images=images, return_tensors="pt", input_data_format="channels_first")["pixel_values"]
    return (got.float() - probe["x"]).abs().max().item()


def _open(run_dir, which: str):
    from lamina.runs import RunFolder, open_run

    if which not in ("best", "last"):
        raise ConfigError(f"--which: expected best or last, got {which!r}")
    if not RunFolder.is_run(Path(run_dir)):
        raise ConfigError(f"{run_dir}: not a run folder (expected a folder with checkpoints/ from `lamina train`, "
                          "or a checkpoint folder with meta.json)")
    run = open_run(run_dir, which)
    run.model.cpu().eval()
    return run


def _checked(stage: Path, check) -> dict:
    """Run the parity check on the staged folder; over MAX_ABS_DIFF (or failing to load) removes the stage and
    raises ParityError, so a wrong export never replaces a good one."""
    from lamina.deploy.export import MAX_ABS_DIFF, ParityError

    try:
        parity = check()
        worst = max(parity.values())
        if not worst <= MAX_ABS_DIFF:
            raise ParityError(f"the exported folder differs from the run's model by {worst:.3g} (limit "
                              f"{MAX_ABS_DIFF:g} on logits, 0 greedy tokens): "
                              f"{', '.join(f'{k} {v:.3g}' for k, v in parity.items())}")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return parity


def _write_result(out: Path, result: dict) -> None:
    atomic_write_text(out.parent / f"{out.name}.export.json", json.dumps(result, indent=2, default=str) + "\n")


def _stage(progress, done: int) -> None:
    """An export's 2 stages for progress(done, total): writing, then checking."""
    if progress is not None:
        progress(done, 2)


def export_hf_run(run_dir, out=None, which: str = "best", progress=None) -> dict:
    """The run's model (a LoRA run's with its adapters merged) as an HF-layout folder (default RUN/export/hf),
    checked by reading it back; returns
    {"run", "checkpoint", "format": "hf", "folder", "architecture", "files", "parity": {...}}.
    `progress(done, total)`: 2 stages, the folder written, then its parity check (transformers' import included)."""
    from lamina.hub.hf_write import hf_spec, write_hf_folder
    from lamina.nn.lora import lora_modules

    run = _open(run_dir, which)
    model = run.model
    if lora_modules(model):  # a LoRA run: the adapters merged into their weights (--format peft keeps them apart)
        import copy

        from lamina.nn.lora import remove_lora

        model = copy.deepcopy(model)
        remove_lora(model, merge=True)
    spec = hf_spec(model)
    _label_names(spec, run.facts)
    folder = Path(out) if out else run.folder.path / "export" / "hf"
    probe = _probe(run, model, spec)
    files = _tokenizer_files(run, spec)
    files.update(_generation_config(files, spec))
    files.update(_preprocessor_files(run, spec))
    stage = folder.with_name(f".candidate-{folder.name}")  # replaces `folder` only once it passed the checks
    _stage(progress, 0)
    write_hf_folder(model, stage, files, spec=spec)
    _stage(progress, 1)

    def check() -> dict:
        out = _check_hf(model, spec, stage, probe)
        if model is not run.model:  # merging adds the update into the weights: float rounding, reported
            out["lora_merge_max_abs_diff"] = (_lamina_logits(model, spec, probe) -
                                              _lamina_logits(run.model, spec, probe)).abs().max().item()
        return out

    parity = _checked(stage, check)
    atomic_write_text(stage / "README.md", model_card(run, spec, "hf", parity))
    publish_folder(stage, folder)
    _stage(progress, 2)
    result = {"run": str(run.folder.path), "checkpoint": str(run.checkpoint), "format": "hf", "folder": str(folder),
              "architecture": spec.architecture, "files": sorted(p.name for p in folder.iterdir()),
              "probe": list(next(iter(probe.values())).shape), "probe_what": _probe_what(probe, spec), "parity": parity}
    _write_result(folder, result)
    return result


def export_peft_run(run_dir, out=None, which: str = "best", progress=None) -> dict:
    """A LoRA run's adapters as a PEFT folder (default RUN/export/peft) with the frozen base model in base/;
    checked through lamina's reader (base) and, with transformers + peft installed, PeftModel.from_pretrained.
    `progress(done, total)`: as export_hf_run."""
    import copy

    from lamina.hub.hf_write import hf_spec, peft_adapter, write_hf_folder, write_peft_files
    from lamina.nn.lora import lora_modules, remove_lora
    from lamina.runs.build import lora_head

    run = _open(run_dir, which)
    model = run.model
    if run.cfg.finetune.mode != "lora" or not lora_modules(model):
        raise ConfigError(f"--format peft: {run_dir} is not a LoRA run (finetune.mode={run.cfg.finetune.mode}); "
                          "train with finetune.mode=lora, or export the whole model with --format hf")
    spec = hf_spec(model)  # the base's layout (adapters left out); ModelError if HF cannot represent it
    if spec.family not in PEFT_FAMILIES:
        raise ModelError(f"--format peft: LoRA adapters of a {spec.family} run are not written as PEFT adapters; "
                         "supported: gpt, llama, bert; --format hf exports this run with its adapters "
                         "merged into the weights")
    _label_names(spec, run.facts)
    base = copy.deepcopy(model)
    remove_lora(base, merge=False)
    # base_model_name_or_path: the HF-layout folder the run started from, if it did; else none (a lamina run or
    # package is no name transformers resolves): the frozen base ships in base/ either way
    source = run.cfg.model.pretrained
    hf_base = source if source and (Path(source) / "config.json").is_file() else None
    adapter = peft_adapter(model, spec, trained=lora_head(model, run.task), base_model=hf_base)
    folder = Path(out) if out else run.folder.path / "export" / "peft"
    ids = {"ids": _probe_ids(run, model.vocab_size, min(model.block_size, 64))}
    files = _tokenizer_files(run, spec)
    base_spec = hf_spec(base)
    _label_names(base_spec, run.facts)

    def write(tmp: Path) -> None:
        write_peft_files(tmp, adapter, files)
        write_hf_folder(base, tmp / "base", {**files, **_generation_config(files, base_spec)}, spec=base_spec)

    stage = folder.with_name(f".candidate-{folder.name}")
    _stage(progress, 0)
    write_folder(stage, write)
    _stage(progress, 1)
    parity = _checked(stage, lambda: _check_peft(model, base, spec, stage, ids))
    atomic_write_text(stage / "README.md", model_card(run, spec, "peft", parity))
    publish_folder(stage, folder)
    _stage(progress, 2)
    result = {"run": str(run.folder.path), "checkpoint": str(run.checkpoint), "format": "peft", "folder": str(folder),
              "architecture": spec.architecture, "target_modules": adapter.config["target_modules"],
              "r": adapter.config["r"], "lora_alpha": adapter.config["lora_alpha"],
              "files": sorted(p.name for p in folder.iterdir()), "probe": list(ids["ids"].shape), "parity": parity}
    _write_result(folder, result)
    return result


def _check_peft(model, base, spec, folder: Path, ids) -> dict:
    """Max abs differences: the base folder read back by lamina against the base; with transformers and peft,
    PeftModel(base folder, adapter) against the LoRA model."""
    from lamina.hub.hf import load_hf_folder

    back, _ = load_hf_folder(folder / "base")
    out = {"lamina_base_roundtrip_max_abs_diff":
           (_lamina_logits(back.eval(), spec, ids) - _lamina_logits(base.eval(), spec, ids)).abs().max().item()}
    if importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("peft") is not None:
        from peft import PeftModel

        with _quiet_transformers():
            hf = PeftModel.from_pretrained(_transformers_model(spec, folder / "base"), str(folder)).eval()
        want = _lamina_logits(model, spec, ids)
        out["peft_max_abs_diff"] = (_hf_logits(hf, spec, ids) - want).abs().max().item()
    return out


__all__ = ["HF_FORMATS", "export_hf_run", "export_peft_run", "greedy_mismatches", "model_card"]
