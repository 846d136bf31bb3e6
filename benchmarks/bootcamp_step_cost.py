"""Cost of one Boot Camp conversion step relative to one ordinary supervised training step, side by side.

    python benchmarks/bootcamp_step_cost.py [--model resnet50] [--size 128] [--batch 4] [--repeats 3]

Both steps run on the same model, batch and device, alternating, so that the ratio holds across machines
(it counts passes: the frozen base's forward, the student's forward, per rep an input-gradient backward and a
shifted forward, then one backward through all of them). Multiply a published images/s for ordinary training
of the model on your GPU by 1/ratio to estimate conversion throughput (see README "Scaling out").
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def main() -> None:
    import timm

    from certify_zoo.draws import keyed_draws
    from certify_zoo.models import ImageClassifier, preprocessing_config
    from certify_zoo.objective import ObjectiveSettings, boot_camp_loss, effective_gamma

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = timm.create_model(args.model, pretrained=False)
    student = ImageClassifier(net, preprocessing_config(net)).to(device).train()
    base = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, student.num_classes, (args.batch,), device=device)
    settings = ObjectiveSettings(reps=args.reps)
    gamma = effective_gamma(settings.gamma, student.num_classes)

    def supervised():
        loss = torch.nn.functional.cross_entropy(student(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def boot_camp(step=[0]):
        step[0] += 1
        draws = keyed_draws(0, step[0], 0, args.batch, images.shape, student.num_classes, settings, device)
        loss = boot_camp_loss(student, base, images, settings, gamma, draws).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def timed(function) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    supervised(), boot_camp()  # warm-up
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(timed(supervised))
        ours.append(timed(boot_camp))
    ratio = statistics.median(ours) / statistics.median(plain)
    print(f"{args.model} {args.size}px batch {args.batch} reps {args.reps} on {device}: supervised step "
          f"{statistics.median(plain):.3f}s, Boot Camp step {statistics.median(ours):.3f}s, ratio {ratio:.1f}x")


if __name__ == "__main__":
    main()
