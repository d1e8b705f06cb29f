"""The `mjsd` command line. Each subcommand is a thin layer over the Python API."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mjsd")
def main() -> None:
    """mjsd: energy-aware multi-token joint speculative decoding on ONNX Runtime."""
