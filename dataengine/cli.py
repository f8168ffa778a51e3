"""The `dataengine` console script: backend/cli.py's serving commands and training/cli.py's training commands.

It sits above both halves, so that backend/ never imports training/ and training/ hosts no serving command.
"""
from __future__ import annotations

import argparse

from backend.cli import add_serving_commands, run_serving_command, start_logging
from training.cli import add_training_commands, prepare_embedded_model, run_training_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataengine", description="Label Studio ML backend that learns from annotators")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serving_commands(commands)
    add_training_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if start_logging() is None:
        return 2
    if args.command == "serve" and prepare_embedded_model() != 0:  # the embedded model's checkpoint, written once
        return 2
    code = run_training_command(args)
    if code is None:
        code = run_serving_command(args)
    return code or 0
