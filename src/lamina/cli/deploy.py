"""The export verb: ONNX and torch.export with an automatic parity check (lamina.deploy.export); Hugging
Face-layout folders and PEFT LoRA adapters (lamina.deploy.hf_export)."""

from __future__ import annotations

import argparse
import json


def add_parsers(sub) -> None:
    e = sub.add_parser("export", help="export a trained run to ONNX (dynamo exporter; --int8 adds a quantized "
                                      "copy), a torch.export program, a Hugging Face-layout folder (hf) or a PEFT "
                                      "LoRA adapter (peft), checked against PyTorch")
    e.add_argument("path", metavar="RUN_DIR")
    e.add_argument("--format", default="onnx", metavar="FORMAT", help="onnx | torch-export | hf | peft (default onnx)")
    e.add_argument("--int8", action="store_true", help="also write an int8 ONNX model (onnxruntime.quantization: "
                                                       "static QDQ for conv nets, dynamic for the rest)")
    e.add_argument("--out", default=None, help="artifact path or folder (default RUN_DIR/export/model.onnx|.pt2, "
                                                       "RUN_DIR/export/hf/ or RUN_DIR/export/peft/)")
    e.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint of the run")
    e.add_argument("--batch", type=int, default=64, help="real test samples for the parity check")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def format_table(result: dict) -> str:
    """file | size MB | exporter | max abs diff | argmax agreement (| accuracy on the batch)."""
    rows = [("file", "size MB", "exporter", "max abs diff", "argmax agree", "batch acc")]
    for a in result["artifacts"]:
        acc = a.get("accuracy")
        rows.append((a["file"], f"{a['size_mb']:.3f}", a["exporter"], f"{a['max_abs_diff']:.3g}",
                     f"{a['argmax_agreement']:.2f}%", "-" if acc is None else f"{acc:.2f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 or i == 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    head = (f"{result['model']} ({result['format']}): parity on {result['batch']} real {result['split']} samples "
            f"from {result['checkpoint']}")
    return "\n".join([head, *lines])


def format_hf(result: dict) -> str:
    """folder, architecture, files and the parity numbers of an hf / peft export."""
    lines = [f"{result['architecture']} ({result['format']}) from {result['checkpoint']} -> {result['folder']}",
             f"files: {', '.join(result['files'])}"]
    if result["format"] == "peft":
        lines.append(f"target_modules: {', '.join(result['target_modules'])}; r={result['r']}, "
                     f"lora_alpha={result['lora_alpha']:g}")
    probe = result.get("probe_what") or f"{'x'.join(str(n) for n in result['probe'])} token ids"
    for k, v in result["parity"].items():
        if isinstance(v, int):  # a count (T5's greedy token mismatches)
            lines.append(f"{k.replace('_', ' ')} ({probe}): {v}")
        else:
            kind = "pixel" if "preprocessor" in k else "logit"
            lines.append(f"max abs {kind} diff ({probe}), {k.removesuffix('_max_abs_diff')}: {v:.3g}")
    return "\n".join(lines)


def cmd_export(a, console) -> int:
    from lamina.deploy.export import FORMATS, export_run
    from lamina.deploy.hf_export import HF_FORMATS, export_hf_run, export_peft_run
    from lamina.errors import ConfigError, unknown_name

    if a.format not in (*FORMATS, *HF_FORMATS):
        raise ConfigError(f"--format: {unknown_name('format', a.format, (*FORMATS, *HF_FORMATS))}")
    if a.format in HF_FORMATS:
        if a.int8:
            raise ConfigError(f"--int8: quantized export is ONNX only; drop --int8 for --format {a.format}")
        from lamina.cli.progress import progress_bar

        with progress_bar(console, f"export {a.format}", getattr(a, "no_progress", False)) as progress:
            result = (export_hf_run if a.format == "hf" else export_peft_run)(a.path, out=a.out, which=a.which,
                                                                               progress=progress)
        print(json.dumps(result, default=str) if a.json else format_hf(result))
        return 0
    from lamina.cli.progress import progress_bar

    with progress_bar(console, f"export {a.format}", getattr(a, "no_progress", False)) as progress:
        result = export_run(a.path, fmt=a.format, int8=a.int8, out=a.out, which=a.which, batch=a.batch,
                            progress=progress)
    if a.json:
        print(json.dumps(result, default=str))
    else:
        print(format_table(result))
        for row in result["artifacts"]:
            if row.get("fallback_reason"):
                console.print(f"[yellow]note:[/] {row['file']}: dynamo exporter failed ({row['fallback_reason']}); "
                              f"exported with {row['exporter']}")
    return 0


COMMANDS: dict = {"export": cmd_export}
