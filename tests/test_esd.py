"""ESD on the built-in world: the erased shape stops being drawn, the others stay. The bars fail
if the method does nothing (the base model draws every shape)."""

from __future__ import annotations

import pytest
import torch

from fasterase import api
from fasterase.config import make_config
from fasterase.errors import UserError
from fasterase.methods.configs import ESD_TRAINABLE_SETS, ESDConfig
from fasterase.methods.esd import ESD  # importing registers the method
from fasterase.names import PARAMETER_SETS

TINY = {"concepts": ["circle", "ring"], "steps": 2, "trajectories": 2, "sample_steps": 2, "batch_size": 2, "log_every": 1}


@pytest.mark.parametrize("options", [
    {},
    {"preserve": ["square"]},
    {"trainable": "x-strict", "negative_guidance": 2.0},
    {"trainable": "u"},
    {"trainable": "all"},
])
def test_esd_changes_only_its_trainable_set(tiny_pipeline_dir, options):
    from fasterase.models.loading import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    cfg = make_config(ESDConfig, {**TINY, **options})
    reports = []
    result = ESD().erase(pipe, cfg, progress=lambda step, total, losses: reports.append((step, total, losses)))
    changed = {f"unet.{n}" for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(result.tensors)
    our_set = PARAMETER_SETS[ESD_TRAINABLE_SETS[cfg.trainable]]
    assert all(our_set(name.removeprefix("unet.")) for name in result.tensors)
    assert result.key is None
    expected = {"erase", "keep"} if cfg.preserve else {"erase"}
    assert [r[:2] for r in reports] == [(0, 2), (1, 2), (2, 2)] and set(reports[-1][2]) == expected
    assert not any(p.requires_grad or p.grad is not None for p in pipe.unet.parameters())


@pytest.mark.parametrize("options, words", [
    ({"trainable": "xattn"}, "trainable"),
    ({"negative_guidance": -1.0}, "negative_guidance"),
    ({"templates": ["a circle"]}, "template"),
    ({"trajectories": 0}, "trajectories"),
])
def test_esd_refuses_bad_options(options, words):
    with pytest.raises(UserError, match=words):
        make_config(ESDConfig, {"concepts": ["circle"], **options})


@pytest.mark.slow
def test_erases_the_shape_and_keeps_the_others(tmp_path, assert_erased, world_sampling):
    summary = api.erase("esd", ["circle"], out=tmp_path / "x.safetensors")
    assert_erased(api.evaluate(summary.edit, n=16, sampling=world_sampling))
    assert summary.key is None


def test_sd14_preset_loads():
    from fasterase.config import preset

    cfg = make_config(ESDConfig, preset("esd", "sd14"), {"concepts": ["circle"]})
    assert cfg.lr == 1e-5 and cfg.steps == 1000 and cfg.negative_guidance == 1.0 and cfg.trainable == "x"


def test_a_forced_backend_runs_every_cross_attention_layer(tiny_pipeline_dir, tmp_path, monkeypatch):
    """ESD sets no processors of its own: a forced backend still runs its sampling and training,
    and cuda, in which cross_attention is not written, runs the reference."""
    from fasterase import kernels

    backends = []
    attend = kernels.cross_attention

    def recorded(*args, backend, **kwargs):
        backends.append(backend)
        return attend(*args, backend=backend, **kwargs)

    monkeypatch.setattr(kernels, "cross_attention", recorded)
    options = {k: v for k, v in TINY.items() if k != "concepts"}
    api.erase("esd", ["circle"], model=tiny_pipeline_dir, out=tmp_path / "e.safetensors", backend="cuda", **options)
    assert backends and set(backends) == {"torch"}


def test_the_trajectory_bank_keeps_the_predictions_sampling_made(tiny_pipeline_dir):
    """ESD, CA and KPOP take their targets from the bank: what sampling stored must be what the
    frozen model predicts at each x_t, under the entry's prompt and under the empty prompt."""
    from fasterase.methods.trajectories import predict_noise, sample_trajectories
    from fasterase.models.loading import load_pipeline
    from fasterase.models.family import encode

    pipe = load_pipeline(tiny_pipeline_dir)
    prompts = ["a circle", "a photo of a ring", "a square"]
    bank = sample_trajectories(pipe, prompts, steps=3, guidance=3.0, seed=0, batch_size=2)
    assert len(bank) == 9 and bank.prompt_index.tolist() == [0, 1] * 3 + [2] * 3
    context = encode(pipe, prompts)
    empty = encode(pipe, [""]).expand(len(bank))
    for stored, text in ((bank.eps_prompt, context[bank.prompt_index]), (bank.eps_empty, empty)):
        torch.testing.assert_close(stored, predict_noise(pipe.unet, bank.latents, bank.timesteps, text, 128), rtol=1e-4, atol=1e-5)
    half = bank.take(bank.prompt_index == 2)
    assert torch.equal(half.eps_prompt, bank.eps_prompt[6:]) and torch.equal(half.latents, bank.latents[6:])
