"""The summary table of a ``benchmarks/gpu_check.sh`` folder (``summary.md``): the steps, the CUDA tests,
the MoE layer's bf16 training times and targets, and the MoE-LLM step times, from the files it wrote.

    .venv/bin/python benchmarks/gpu_summary.py gpu-check
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def summary(folder: Path) -> str:
    lines = [f"# GPU check: {folder}", ""]
    hardware = folder / "hardware.log"
    if hardware.is_file():
        lines += ["Hardware: " + (hardware.read_text().strip().splitlines() or ["?"])[-1], ""]
    if (folder / "steps.txt").is_file():
        lines += ["| step | result |", "|---|---|"]
        lines += [
            f"| {ln.split()[0]} | {' '.join(ln.split()[1:])} |"
            for ln in (folder / "steps.txt").read_text().splitlines()
        ]
        lines.append("")
    report = folder / "cuda-tests.xml"
    if report.is_file():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        get = lambda k: int(suite.get(k, 0))  # noqa: E731
        lines += [
            f"CUDA tests: {get('tests')} run, {get('failures')} failed, {get('errors')} errors, {get('skipped')} skipped",
            "",
        ]
    moe = folder / "moe_layer.json"
    if moe.is_file():
        rows = json.loads(moe.read_text())
        lines += [
            "MoE layer, bf16 training step (ms, median):",
            "",
            "| shape | method | train ms | fwd ms |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['shape']} | {r['method']} | {r['train_ms']:.2f} | {r['forward_ms']:.2f} |"
            for r in rows
            if r["dtype"] == "bfloat16"
        ]
        lines.append("")
    mllm = folder / "mllm.json"
    if mllm.is_file():
        lines += ["MoE-LLM training step:", "", "| model | step ms | tokens/s | vs dense |", "|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['step_ms']} | {r['tokens_per_s']} | {r['slowdown_vs_dense']} |"
            for r in json.loads(mllm.read_text())
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-check")), end="")
