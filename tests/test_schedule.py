"""The learning-rate schedule (engine/schedule.py) at known steps and times, its warm-up
forms, and its state across a resume."""
from __future__ import annotations

import math

import pytest
import torch

from fastfilm.config import TRAIN_PRESETS, TrainConfig, parse_warmup, train_recipe
from fastfilm.engine.schedule import LRSchedule


def test_constant_is_the_base_lr_at_every_step():
    s = LRSchedule(base_lr=3e-4, kind="constant", total_steps=100)
    assert [s.lr(k) for k in (0, 1, 50, 99, 100, 1000)] == [3e-4] * 6


@pytest.mark.parametrize("kind, expected", [
    ("cosine", {0: 1.0, 25: 0.5 * (1 + math.cos(math.pi / 4)), 50: 0.5, 75: 0.5 * (1 + math.cos(3 * math.pi / 4)),
                100: 0.0, 150: 0.0}),
    ("linear", {0: 1.0, 25: 0.75, 50: 0.5, 75: 0.25, 100: 0.0, 150: 0.0}),
])
def test_decay_by_steps(kind, expected):
    s = LRSchedule(base_lr=2.0, kind=kind, total_steps=100)
    for step, factor in expected.items():
        assert s.lr(step) == pytest.approx(2.0 * factor, abs=1e-12), step


def test_warmup_steps_ramp_linearly_then_decay():
    s = LRSchedule(base_lr=1.0, kind="linear", total_steps=100, warmup_steps=10)
    assert s.lr(0) == pytest.approx(0.1 * 1.0)          # (0 + 1) / 10, progress 0
    assert s.lr(4) == pytest.approx(0.5 * 0.96)         # (4 + 1) / 10, decay 1 - 4/100
    assert s.lr(9) == pytest.approx(1.0 * 0.91)
    assert s.lr(60) == pytest.approx(0.4)


def test_warmup_fraction_of_the_budget():
    s = LRSchedule(base_lr=1.0, kind="constant", total_steps=200, warmup_fraction=0.1)
    assert s.lr(0) == pytest.approx(1 / 200 / 0.1)      # one step's worth, not 0
    assert s.lr(10) == pytest.approx(0.5)
    assert s.lr(20) == pytest.approx(1.0) and s.lr(150) == pytest.approx(1.0)


def test_time_budget_drives_the_decay_when_it_ends_first():
    # 1000 steps of epochs, 60 s of time: after 30 s at step 100 the run is half-way.
    s = LRSchedule(base_lr=1.0, kind="cosine", total_steps=1000, budget_s=60)
    assert s.reads_clock
    s.observe(30.0)
    assert s.progress(100) == pytest.approx(0.5) and s.lr(100) == pytest.approx(0.5)
    # ... and the steps when they are further along than the clock.
    assert s.progress(800) == pytest.approx(0.8)
    s.observe(90.0)  # over the budget: the end of the schedule, never past it
    assert s.progress(100) == 1.0 and s.lr(100) == pytest.approx(0.0)


def test_constant_without_warmup_ignores_the_clock():
    s = LRSchedule(base_lr=1.0, kind="constant", total_steps=10, budget_s=60)
    assert not s.reads_clock
    s.observe(59.0)
    assert s.lr(3) == 1.0


def test_resume_continues_the_same_sequence():
    """A schedule rebuilt from the run's settings and last.pt's state gives the learning rates
    the uninterrupted one gives, clock readings included."""
    clock = [0.5 * k for k in range(40)]  # seconds at each step (a fake clock)

    def make():
        return LRSchedule(base_lr=1e-3, kind="cosine", total_steps=400, budget_s=15.0, warmup_steps=5)

    straight = make()
    expected = []
    for step, t in enumerate(clock):
        straight.observe(t)
        expected.append(straight.lr(step))
    first = make()
    got = []
    for step, t in enumerate(clock[:17]):
        first.observe(t)
        got.append(first.lr(step))
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert resumed.lr(17) == first.lr(17)  # before the resumed run reads its clock
    for step, t in enumerate(clock[17:], start=17):
        resumed.observe(t)
        got.append(resumed.lr(step))
    assert got == expected
    assert expected[0] < expected[4] and expected[-1] < expected[10]  # it warmed up and decays


def test_apply_sets_every_param_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=5.0)
    s = LRSchedule(base_lr=2.0, kind="linear", total_steps=4)
    assert s.apply(opt, 2) == pytest.approx(1.0)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1.0)] * 2


@pytest.mark.parametrize("spec, parsed", [("0", (0, 0.0)), ("200", (200, 0.0)), ("5%", (0, 0.05)),
                                          (" 12 ", (12, 0.0)), ("0%", (0, 0.0))])
def test_parse_warmup(spec, parsed):
    assert parse_warmup(spec) == pytest.approx(parsed)


@pytest.mark.parametrize("spec", ["-1", "100%", "abc", "5.5", "", "nan%"])
def test_parse_warmup_refuses(spec):
    with pytest.raises(ValueError, match="number of steps"):
        parse_warmup(spec)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        LRSchedule(base_lr=1.0, kind="step")
    with pytest.raises(ValueError):
        LRSchedule(base_lr=1.0, warmup_steps=3, warmup_fraction=0.1)


RECIPE = ("lr", "batch_size", "weight_decay", "group_questions", "lr_schedule", "warmup")


def test_recipe_comes_from_the_preset_unless_given():
    paper = train_recipe(TrainConfig(preset="paper"))
    # The paper's recipe, written out here rather than read back from TRAIN_PRESETS.
    assert tuple(getattr(paper, k) for k in RECIPE) == (3e-4, 64, 1e-5, 1, "constant", "0")
    assert tuple(getattr(train_recipe(TrainConfig(preset="auto")), k) for k in RECIPE) == \
        tuple(getattr(paper, k) for k in RECIPE)
    cpu = train_recipe(TrainConfig(preset="cpu"))
    assert {k: getattr(cpu, k) for k in RECIPE} == TRAIN_PRESETS["cpu"]
    mine = train_recipe(TrainConfig(preset="cpu", lr_schedule="linear", warmup="7", lr=5e-4, batch_size=32,
                                    weight_decay=0.0, group_questions=1))
    assert tuple(getattr(mine, k) for k in RECIPE) == (5e-4, 32, 0.0, 1, "linear", "7")


def test_every_preset_has_a_whole_recipe():
    for name, recipe in TRAIN_PRESETS.items():
        assert set(recipe) == set(RECIPE), name
        assert recipe["lr"] > 0 and recipe["batch_size"] >= 2 and recipe["weight_decay"] >= 0, name
        assert recipe["group_questions"] >= 1 and recipe["lr_schedule"] in ("constant", "cosine", "linear"), name
        parse_warmup(recipe["warmup"])
