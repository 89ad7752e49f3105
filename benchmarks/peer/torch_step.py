"""The PyTorch peer of our training step: SimSiam in PyTorch with lightly's
heads and loss, timed as a training step (forward, backward,
optimizer.step) on one fixed synthetic batch, in float32 and under
`torch.autocast("cpu", dtype=torch.bfloat16)`.

It runs in its own virtual environment, not simclic_tf's:

    python -m venv ~/peer-venv
    ~/peer-venv/bin/pip install -r benchmarks/peer/requirements.txt
    ~/peer-venv/bin/python benchmarks/peer/torch_step.py --width 32 --threads 2

and prints one JSON object: seconds per step for each precision (the median
of `--rounds` rounds of `--steps` steps after `--warmup-steps` untimed
steps, the precisions taking turns each round) and the versions.
`benchmarks/peer_step.py` runs it with `--serve` instead: it builds and warms
up, prints {"ready": ...}, then answers each stdin line
{"precision": P, "steps": N} with {"seconds_per_step": s}, so that its rounds
interleave with ours while it waits.

The model mirrors simclic_tf's (`SimCLICConfig(backbone="resnet18_cifar",
perturbation="none")` with the same width, proj_dim and pred_hidden):
  - lightly's CIFAR ResNet-18 (`ResNetGenerator("resnet-18", width=W / 64)`:
    3x3 stride-1 stem, no max-pool, basic blocks with 1x1 projection
    shortcuts where the shape changes, no conv biases, a 4x4 average pool:
    global on 32x32 images), its classifier replaced by the identity;
    parameter and BatchNorm counts equal ours (width 32: 2,795,040
    backbone, 4,722,688 projector, 2,100,224 predictor parameters);
  - the projector of simclic_tf.heads.build_projector, built from lightly's
    `ProjectionHead` (the base of `SimSiamProjectionHead`) with SimSiam's
    blocks: Linear(no bias)-BN-ReLU, Linear(no bias)-BN(affine=False). That
    is SimSiam's two-layer CIFAR projector; lightly's stock
    `SimSiamProjectionHead` is the three-layer ImageNet one
    (`--projector-layers 3` times that instead);
  - lightly's `SimSiamPredictionHead(P, H, P)`: Linear(no bias)-BN-ReLU,
    Linear(bias), as simclic_tf's "mlp2";
  - lightly's `NegativeCosineSimilarity`, symmetric, with stop-gradient
    (`detach`) on the targets; each view through the backbone separately;
  - SGD, momentum 0.9, weight decay 5e-4 (L2 in the gradient, as ours), the
    predictor in its own parameter group as ours.
Differences left: PyTorch's NCHW layout (`--channels-last`: NHWC), BN
epsilon 1e-5 (Keras 1e-3), and ours also updates its loss, z_std and z_rank
(an SVD) metrics each step.
"""

import argparse
import json
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def import_lightly():
    """lightly's package imports torchvision. The CPU-only torch build with
    a torchvision wheel built for CUDA torch (all that some indexes serve)
    cannot load torchvision's C++ ops, and torchvision 0.28 then fails on
    import at registering fake kernels for `torchvision::nms` and `qnms`.
    Neither op is used here: declaring their schemas lets the import go on
    (calling them would still fail). A torchvision that loads its ops
    (PyTorch's CPU index pairs one with the CPU torch) needs none of this."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
        for module in [m for m in sys.modules
                       if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        # Kept on the function: the schemas live as long as the Library object.
        import_lightly.library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            import_lightly.library.define(
                f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models import ResNetGenerator
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
    from lightly.models.modules.heads import ProjectionHead
    return (NegativeCosineSimilarity, ResNetGenerator, ProjectionHead,
            SimSiamPredictionHead, SimSiamProjectionHead)


class SimSiam(nn.Module):
    def __init__(self, width, proj_dim, pred_hidden, projector_layers=2):
        super().__init__()
        (_, ResNetGenerator, ProjectionHead, SimSiamPredictionHead,
         SimSiamProjectionHead) = import_lightly()
        self.backbone = ResNetGenerator("resnet-18", width=width / 64)
        features = self.backbone.linear.in_features
        self.backbone.linear = nn.Identity()
        if projector_layers == 3:
            self.projector = SimSiamProjectionHead(features, proj_dim, proj_dim)
        else:
            self.projector = ProjectionHead([
                (features, proj_dim, nn.BatchNorm1d(proj_dim), nn.ReLU()),
                (proj_dim, proj_dim, nn.BatchNorm1d(proj_dim, affine=False), None),
            ])
        self.predictor = SimSiamPredictionHead(proj_dim, pred_hidden, proj_dim)

    def forward(self, x):
        z = self.projector(self.backbone(x))
        return z, self.predictor(z)


class Step:
    """One model, optimizer and fixed batch; `run(n)` takes n training steps."""

    def __init__(self, args, precision):
        torch.manual_seed(0)
        self.bf16 = precision == "bfloat16"
        self.model = SimSiam(args.width, args.proj_dim, args.pred_hidden,
                             args.projector_layers)
        self.criterion = import_lightly()[0]()
        lr = 0.12 * args.batch_size / 256  # simclic_tf's base_lr
        predictor = list(self.model.predictor.parameters())
        others = [p for n, p in self.model.named_parameters() if not n.startswith("predictor.")]
        self.optimizer = torch.optim.SGD([{"params": others}, {"params": predictor}],
                                         lr=lr, momentum=0.9, weight_decay=5e-4)
        shape = (args.batch_size, 3, args.image_size, args.image_size)
        generator = torch.Generator().manual_seed(0)
        self.views = [torch.rand(shape, generator=generator) for _ in range(2)]
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.views = [v.contiguous(memory_format=torch.channels_last) for v in self.views]
        self.model.train()

    def step(self):
        x0, x1 = self.views
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            z0, p0 = self.model(x0)
            z1, p1 = self.model(x1)
            loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def run(self, steps):
        """Seconds per step over `steps` steps."""
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        float(loss)
        return (time.perf_counter() - start) / steps


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32,
                        help="base channels (64 x lightly's width)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--pred-hidden", type=int, default=512)
    parser.add_argument("--projector-layers", type=int, choices=(2, 3), default=2,
                        help="2: simclic_tf's (SimSiam CIFAR) projector; 3: lightly's "
                             "SimSiamProjectionHead")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="comma-separated: float32, bfloat16 (autocast)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--channels-last", action="store_true",
                        help="NHWC memory format (default: PyTorch's NCHW)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--serve", action="store_true",
                        help="answer {precision, steps} lines on stdin (for peer_step.py)")
    args = parser.parse_args(argv)
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in args.precisions if p not in PRECISIONS]
    if bad or not args.precisions:
        parser.error(f"--precisions: choose from {', '.join(PRECISIONS)}")
    return args


def info(args):
    import lightly
    return {"torch": torch.__version__, "lightly": lightly.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn": torch.backends.mkldnn.is_available(),
            "channels_last": args.channels_last, "projector_layers": args.projector_layers}


def reply(obj):
    print(json.dumps(obj), flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {}
    for precision in args.precisions:
        steps[precision] = Step(args, precision)
        steps[precision].run(args.warmup_steps)
    if args.serve:
        reply({"ready": True, **info(args)})
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            if request.get("quit"):
                break
            reply({"seconds_per_step": steps[request["precision"]].run(int(request["steps"]))})
        return
    samples = {p: [] for p in steps}
    for _ in range(args.rounds):
        for precision, step in steps.items():
            samples[precision].append(step.run(args.steps))
    reply({"seconds_per_step": {p: statistics.median(s) for p, s in samples.items()},
           "rounds": samples, "steps": args.steps, "width": args.width,
           "batch_size": args.batch_size, **info(args)})


if __name__ == "__main__":
    main()
