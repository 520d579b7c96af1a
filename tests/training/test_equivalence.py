"""Training computes the same numbers as the code the reference was saved from.

A few seeded steps on generated images, through both data paths (per-image torchvision views in
the loader; decoded once, views made in batches), compared with tensors saved by an earlier version
(tests/training/data/equivalence.pt) in two parts:

- the network's initial weights (the norm of each tensor);
- the views the data path made for each step, which must match the reference's up to the rounding
  of 8-bit pixel arithmetic (CPU kernels without vector units round some pixels one level apart);
- the steps, taken on the reference's own views with the networks in float64 and weights drawn by
  NumPy: the losses, the encoder's outputs, and what the steps changed in a few weights (a high
  learning rate makes each step count). Three such steps amplify any last-bit difference until the
  weights disagree in their first digit: in float32, those between CPU kernels (AVX2, AVX-512) and
  thread counts; in torch's own draws, those of its vectorised and plain normal samplers. In float64
  from the same weights the amplified differences stay far below the tolerance, while a changed
  step moves the fingerprints by far more.

A refactoring that changes what a step computes fails here. After a change that is meant to alter
training, rewrite the reference with `python tests/training/test_equivalence.py` and say why in the commit.
"""

import math
from pathlib import Path

import numpy as np
import torch
from helpers import shapes_folder, tiny_plan

REFERENCE = Path(__file__).parent / "data" / "equivalence.pt"
PATHS = ("loader", "in memory")
# Weights of both LARS groups (adapted conv weights, excluded batch-norm parameters), and a running mean.
WEIGHTS = (
    "conv1.weight",
    "bn1.weight",
    "layer3.0.downsample.0.weight",
    "layer4.1.bn2.bias",
    "layer4.1.bn2.running_mean",
)
STEPS = 3
# ‖fingerprint − reference‖ / ‖reference‖: the views may have a few pixels one 8-bit level apart, the
# initial weights float32's rounding; the steps, computed in float64 from the same inputs, hardly any.
TOLERANCE = {"view": 1e-2, "initial": 1e-5, "step": 1e-6}


def fingerprint(folder: Path, in_memory: bool, reference_views: dict | None = None) -> dict:
    """What STEPS seeded steps compute: the views the data path made, and the steps' results.
    The steps take `reference_views` when given, else the data path's own views (rounded to
    float16, as they are stored)."""
    from byolcli.core.scan import scan
    from byolcli.training.engine import Trainer

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
    made = []

    def step_on_stored_views(_, views):
        made.append([view.half() for view in views])
        stored = made[-1] if reference_views is None else [reference_views[f"view {i}"][len(made) - 1] for i in (1, 2)]
        return tuple(view.double() for view in stored)

    model = trainer.model
    initial_norms = torch.stack([p.norm() for p in model.online_parameters()]).double()
    # In place: the optimizer keeps the same parameters, now float64.
    redraw_weights(model.double())
    model.register_forward_pre_hook(step_on_stored_views)
    encoder = model.online_encoder
    initial = {name: encoder.state_dict()[name].clone() for name in WEIGHTS}
    losses = []
    trainer.run(STEPS, on_log=lambda record: losses.append(record["loss"]), log_every=0)
    torch.manual_seed(123)
    with torch.no_grad():
        outputs = encoder.eval()(torch.randn(4, 3, 32, 32, dtype=torch.float64))
    state = encoder.state_dict()
    return {
        "initial weight norms": initial_norms,
        **{f"view {i}": torch.stack([views[i - 1] for views in made]) for i in (1, 2)},
        "losses": torch.tensor(losses, dtype=torch.float64),
        "outputs": outputs,
        **{f"{name} change": state[name] - initial[name] for name in WEIGHTS},
    }


def redraw_weights(model, seed: int = 0) -> None:
    """Every conv and linear weight of the online networks drawn anew by NumPy (He's scale), the
    target a copy: the same numbers on every CPU."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in [*model.online_parameters(), *model.predictor.parameters()]:
            if p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape))) * math.sqrt(2 / fan_in))
        for target, online in zip(model.target_parameters(), model.online_parameters()):
            target.copy_(online)


def kind(name: str) -> str:
    return "view" if name.startswith("view") else "initial" if name.startswith("initial") else "step"


def relative_error(tensor: torch.Tensor, expected: torch.Tensor) -> float:
    return ((tensor.double() - expected.double()).norm() / expected.double().norm()).item()


def test_a_few_seeded_steps_compute_what_the_reference_computed(tmp_path):
    reference = torch.load(REFERENCE, weights_only=True)
    for path in PATHS:
        expected = reference[path]
        tensors = fingerprint(tmp_path / path, in_memory=path == "in memory", reference_views=expected)
        for name, tensor in tensors.items():
            assert tensor.shape == expected[name].shape, f"{path}, {name}: shape {tuple(tensor.shape)}"
            error = relative_error(tensor, expected[name])
            assert error < TOLERANCE[kind(name)], f"{path}, {name}: off the reference by {error:.2e} of its norm"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        REFERENCE.parent.mkdir(exist_ok=True)
        prints = {path: fingerprint(Path(scratch) / path, in_memory=path == "in memory") for path in PATHS}
        # float32 keeps eight digits, more than the tolerances ask, in half the bytes of float64.
        torch.save(
            {
                path: {name: t.float() if t.dtype == torch.float64 else t for name, t in tensors.items()}
                for path, tensors in prints.items()
            },
            REFERENCE,
        )
        print(f"wrote {REFERENCE}")
