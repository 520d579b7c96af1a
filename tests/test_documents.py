"""The documents say what the code and the stored results say."""

import subprocess
import sys

from helpers import REPO


def test_the_benchmark_tables_are_the_ones_the_stored_results_give():
    result = subprocess.run(
        [sys.executable, "benchmarks/tables.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_readme_shows_the_small_stem_lines_the_stem_uses():
    import torch

    from byolcli.core.backbones import make_backbone

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [line for line in readme.splitlines() if line.startswith(("model.conv1 =", "model.maxpool ="))]
    model = torch.nn.Module()
    model.conv1 = model.maxpool = None
    namespace = {"torch": torch, "model": model}
    for line in lines:
        exec(line, namespace)
    small = make_backbone("resnet18", stem="small")

    def shape(conv):
        return conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.bias is None

    assert len(lines) == 2 and shape(model.conv1) == shape(small.conv1)
    assert type(model.maxpool) is type(small.maxpool) is torch.nn.Identity


def test_every_command_the_readme_shows_exists_with_the_flags_it_shows():
    import re

    from typer.testing import CliRunner

    from byolcli.cli import app

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = [line.split("#")[0].strip().removeprefix("$ ") for line in readme.splitlines()]
    commands = [line.split()[1:] for line in commands if line.startswith("byol ")]
    assert len(commands) >= 10
    for words in commands:
        words = [word for word in words if word not in ("-q", "--debug")]
        help_text = CliRunner().invoke(app, [words[0], "--help"], env={"COLUMNS": "200"})
        assert help_text.exit_code == 0, f"byol {words[0]}: {help_text.output}"
        for flag in (word.split("=")[0] for word in words if word.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", help_text.output), f"byol {words[0]} has no {flag}"
