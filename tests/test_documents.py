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

    from byolcli.backbones import make_backbone

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
