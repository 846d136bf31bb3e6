"""A conversion whose penalty breaks the student's agreement with the base goes back to its last good state."""
from __future__ import annotations

import io
import json

import torch
from rich.console import Console

from certify_zoo.rollback import LastGoodState


def test_the_last_good_state_brings_back_weights_buffers_and_momentum():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train_step():
        model(torch.rand(8, 3, 6, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()
    held = LastGoodState(1, model, optimizer)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    for _ in range(3):
        train_step()
    assert not torch.equal(model[0].weight, expected_model["0.weight"])
    held.restore(model, optimizer)
    for key, value in model.state_dict().items():  # BatchNorm's running statistics included
        assert torch.equal(value, expected_model[key]), key
    for parameter, momentum in zip(model.parameters(), expected_momentum):
        assert torch.equal(optimizer.state[parameter]["momentum_buffer"], momentum)
    train_step()  # the optimiser still steps the model's own parameters
    assert not torch.equal(model[0].weight, expected_model["0.weight"])


def test_a_conversion_that_breaches_the_floor_ends_at_a_state_that_meets_it(demo_base, tmp_path):
    """A learning rate five times the demo's and a start ten times its gamma break the student's agreement within one
    check interval: the conversion goes back to the last state that met the floor, caps the SGD step that breached
    (lr x gamma: gamma at most half the breaching weight at that lr, more only as the lr decays), and the saved model
    meets the floor on the held-out slice."""
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe

    out = tmp_path / "breach"
    floor = 0.95
    console = Console(file=io.StringIO(), width=300)
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                        max_steps=40, warmup=0.0, lr=0.1, gamma_start=2.0, agreement_floor=floor),
            console=console)
    record = json.loads((out / "certify_zoo.json").read_text())
    trajectory = record["gamma"]["trajectory"]
    restored = [row for row in trajectory if "restored_to_step" in row]
    assert record["gamma"]["restorations"] == len(restored) >= 1
    by_step = {row["step"]: row for row in trajectory}
    for row in restored:  # each breach went back to a check that met the floor, never forward
        assert row["agreement"] < floor
        assert by_step[row["restored_to_step"]]["agreement"] >= floor and row["restored_to_step"] < row["step"]
    first = trajectory.index(restored[0])
    assert restored[0]["gamma"] <= trajectory[first - 1]["gamma"] / 2 * (1 + 1e-9)  # at most half the weight in force
    for position, row in enumerate(trajectory[first:], start=first):  # SGD: the breached step, lr x gamma, caps
        lr = row.get("lr", trajectory[position - 1]["lr"])  # the final check moves nothing: its last lr
        breaches = [r for r in trajectory[first:position + 1] if "restored_to_step" in r and not r.get("final")]
        if breaches:
            assert row["gamma"] <= min(b["gamma"] * b["lr"] / lr for b in breaches) * (1 + 1e-9)
    assert record["self_check"]["agreement_with_base"] >= floor
    assert not record["gamma"]["undone_entirely"]  # it kept the steps up to its last good check
    from certify_zoo.card import render_card

    times = "1 time" if len(restored) == 1 else f"{len(restored)} times"
    assert (f"{times} the student's agreement with the base fell below the floor {floor}"
            in str(render_card(out)))  # and so does the card's reader
    said = console.file.getvalue()  # the user sees each restoration
    assert said.count("back to its state at step") == len(restored)
    assert f"back to its state at step {restored[0]['restored_to_step']}" in said


def test_only_states_after_warm_up_that_meet_the_floor_are_kept():
    """The demo's agreement dips to ~0.75 while warm-up ramps gamma and lr up, and recovers: a breach after warm-up
    goes back to a state the controller made, never into the ramp."""
    from certify_zoo.conversion import _steer_gamma
    from certify_zoo.selfcheck import BaseAnswers
    from certify_zoo.smoothness import GammaController

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    holdout = torch.rand(16, 3, 4, 4)
    base_answers = BaseAnswers.of(base(holdout))
    agreement = base_answers.agreement(student(holdout))
    meets = GammaController(1.0, agreement_floor=agreement)
    misses = GammaController(1.0, agreement_floor=agreement + 0.01)
    # warm-up
    assert _steer_gamma(meets, student, optimizer, base_answers, holdout, 0.5, 0, 0, None, update=False) is None
    kept = _steer_gamma(meets, student, optimizer, base_answers, holdout, 0.5, 0, 10, None, update=True)
    assert kept is not None and kept.step == 10
    assert _steer_gamma(misses, student, optimizer, base_answers, holdout, 0.5, 0, 20, None, update=True) is None
    assert _steer_gamma(meets, student, optimizer, base_answers, holdout, 0.5, 0, 30, kept, update=False,
                        final=True) is kept


def test_a_conversion_whose_last_check_goes_back_to_step_0_says_it_kept_nothing(demo_base, tmp_path):
    """A conversion whose every check breached the floor saved the base and said only "saved OUT": it reads as a
    converted model. It now says, in its output, record and card, that no step is kept, and the weights are the
    base's to the bit."""
    from safetensors.torch import load_file

    from certify_zoo.card import render_card
    from certify_zoo.conversion import ConvertSettings, convert
    from certify_zoo.recipes import load_recipe

    out = tmp_path / "undone"
    console = Console(file=io.StringIO(), width=400)
    convert(ConvertSettings.from_recipe(load_recipe("demo"), model=str(demo_base), data="demo", out=str(out),
                                        max_steps=6, warmup=0.0, lr=1.0, gamma_start=2.0, agreement_floor=1.0),
            console=console)
    record = json.loads((out / "certify_zoo.json").read_text())
    assert record["gamma"]["trajectory"][-1]["restored_to_step"] == 0 and record["gamma"]["undone_entirely"]
    base, saved = load_file(demo_base / "model.safetensors"), load_file(out / "model.safetensors")
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)
    assert "WARNING: no step of this conversion is kept" in console.file.getvalue()
    assert "no step of the conversion is kept, the weights are the base's" in str(render_card(out))
