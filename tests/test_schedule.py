import pytest
import torch

from diffinv.schedule import Schedule


def test_linear_schedule_endpoints():
    schedule = Schedule.linear()
    assert schedule.T == 1000
    assert float(schedule.betas[0]) == pytest.approx(1e-4)
    assert float(schedule.betas[-1]) == pytest.approx(0.02)
    assert float(schedule.abar[-1]) == pytest.approx(4.0358e-05, rel=1e-3)


def test_respace_keeps_abar_on_kept_steps():
    full = Schedule.linear()
    short = full.respace(100)
    assert short.T == 100
    assert int(short.timesteps[0]) == 0
    assert int(short.timesteps[-1]) == 999
    torch.testing.assert_close(short.abar, full.abar[short.timesteps], rtol=1e-12, atol=0)


def test_respace_to_full_length_is_identity():
    full = Schedule.linear()
    same = full.respace(1000)
    torch.testing.assert_close(same.betas, full.betas, rtol=1e-10, atol=0)


def test_sigma_is_posterior_std():
    schedule = Schedule.linear()
    assert schedule.sigma(0) == 0.0
    abar = schedule.abar
    expected = ((1 - abar[499]) / (1 - abar[500]) * schedule.betas[500]).sqrt()
    assert schedule.sigma(500) == pytest.approx(float(expected))


def test_from_diffusers_linear_matches():
    config = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
    torch.testing.assert_close(Schedule.from_diffusers(config).betas, Schedule.linear().betas)


def test_from_diffusers_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="'sigmoid'"):
        Schedule.from_diffusers({"beta_schedule": "sigmoid"})


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_respace_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match=f"steps = {steps}"):
        Schedule.linear().respace(steps)


def test_index_of_rejects_outside_timestep():
    with pytest.raises(ValueError, match="timestep 1000"):
        Schedule.linear().respace(10).index_of(1000)
