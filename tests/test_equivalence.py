"""Training computes the same numbers as the code the reference was saved from.

A few seeded steps on generated images, through both data paths (per-image torchvision views in
the loader; decoded once, views made in batches), and the exported encoder's weights and outputs
compared with tensors saved by an earlier version (tests/data/equivalence.pt): the losses, the
outputs, and what the steps changed in a few weights (a high learning rate makes each step count).
A refactoring that changes what a step computes fails here. After a change that is meant to alter training, rewrite
the reference with `python tests/test_equivalence.py` and say why in the commit.
"""

from pathlib import Path

import torch
from helpers import shapes_folder, tiny_plan

REFERENCE = Path(__file__).parent / "data" / "equivalence.pt"
# Weights of both LARS groups (adapted conv weights, excluded batch-norm parameters), and a running mean.
WEIGHTS = (
    "conv1.weight",
    "bn1.weight",
    "layer3.0.downsample.0.weight",
    "layer4.1.bn2.bias",
    "layer4.1.bn2.running_mean",
)
STEPS = 3


def fingerprint(folder: Path, in_memory: bool) -> dict:
    from byolcli.engine import Trainer
    from byolcli.scan import scan

    paths = scan(shapes_folder(folder, count=32)).absolute_paths()
    plan = tiny_plan(
        len(paths),
        total_steps=STEPS,
        warmup_steps=1,
        lr=2.0,
        in_memory=in_memory,
        augment_on="device" if in_memory else "cpu",
    )
    trainer = Trainer(plan, paths)
    encoder = trainer.model.online_encoder
    initial = {name: encoder.state_dict()[name].double() for name in WEIGHTS}
    losses = []
    trainer.run(STEPS, on_log=lambda record: losses.append(record["loss"]), log_every=0)
    torch.manual_seed(123)
    with torch.no_grad():
        outputs = encoder.eval()(torch.randn(4, 3, 32, 32))
    state = encoder.state_dict()
    return {
        "losses": torch.tensor(losses),
        "outputs": outputs,
        **{f"{name} change": (state[name].double() - initial[name]).float() for name in WEIGHTS},
    }


def fingerprints(folder: Path) -> dict:
    return {path: fingerprint(folder / path, in_memory=path == "in memory") for path in ("loader", "in memory")}


def test_a_few_seeded_steps_compute_what_the_reference_computed(tmp_path):
    reference = torch.load(REFERENCE, weights_only=True)
    for path, tensors in fingerprints(tmp_path).items():
        for name, tensor in tensors.items():
            # Summation order differs between CPU kernels (AVX2, AVX-512) and thread counts: a changed
            # step moves these by orders of magnitude more.
            torch.testing.assert_close(
                tensor, reference[path][name], rtol=2e-2, atol=1e-6, msg=lambda m, p=path, n=name: f"{p}, {n}: {m}"
            )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        REFERENCE.parent.mkdir(exist_ok=True)
        torch.save(fingerprints(Path(scratch)), REFERENCE)
        print(f"wrote {REFERENCE}")
