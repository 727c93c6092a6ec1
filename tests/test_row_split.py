"""The global batch splits over ranks by rows, unevenly when it must: the split itself, the
micro-batches (as many on every rank), FSDP's mixed-precision policy, and 3 processes on 8 rows
(3/3/2, groups of 4 spanning ranks) ending with the weights and metrics of 1 process."""

from __future__ import annotations

import pytest
import tiny
import torch
from test_distributed import _metrics, _run, assert_same_steps
from test_trainer import _cfg, _trainer

from grpo import distributed, trainer


def test_split_sizes_are_contiguous_and_near_even():
    assert distributed.split_sizes(84, 8) == [11, 11, 11, 11, 10, 10, 10, 10]
    assert distributed.split_sizes(84, 7) == [12] * 7
    assert distributed.split_sizes(8, 3) == [3, 3, 2]
    shares = [distributed.shard(list(range(8)), distributed.Dist(r, 3)) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError, match="cannot give each of 3 processes one"):
        distributed.split_sizes(2, 3)


def _fake_fsdp(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr("torch.distributed.device_mesh.init_device_mesh", lambda *a, **k: "mesh")
    monkeypatch.setattr(
        "torch.distributed.fsdp.fully_shard", lambda module, **kwargs: calls.append(kwargs)
    )
    return calls


def test_fsdp_gathers_in_the_training_dtype_and_reduces_in_fp32(monkeypatch):
    calls = _fake_fsdp(monkeypatch)
    lm = tiny.build_model(tiny.build_tokenizer())
    d = distributed.Dist(0, 2)
    distributed.wrap(lm, "fsdp", d, param_dtype=torch.bfloat16)
    assert len(calls) == lm.config.num_hidden_layers + 1  # every block, then the root
    for kwargs in calls:
        policy = kwargs["mp_policy"]
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    calls.clear()
    distributed.wrap(lm, "fsdp", d)  # fp32 training (CPU): the parameters' own dtype
    assert calls and all("mp_policy" not in kwargs for kwargs in calls)


@pytest.mark.parametrize(
    ("autocast", "expected"),
    [(lambda device: torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16), (None, None)],
    ids=["bf16-autocast", "fp32"],
)
def test_trainer_wraps_with_the_autocast_dtype(tmp_path, monkeypatch, autocast, expected):
    seen = []

    def wrap(model, strategy, d, *, param_dtype=None):
        seen.append(param_dtype)
        return model

    monkeypatch.setattr(trainer.distributed, "wrap", wrap)
    if autocast is not None:
        monkeypatch.setattr(trainer, "autocast_context", autocast)
    _trainer(tmp_path, _cfg(num_steps=1), strategy="fsdp")
    assert seen == [expected]  # the policy (one process: no sharded reference)


@pytest.mark.parametrize(
    "args",
    [
        ("--strategy", "ddp", "--micro-batch-size", "2"),
        # 3 micro-batches per rank: the 2-row rank pads one, keeping the FSDP forwards in step
        ("--strategy", "fsdp", "--micro-batch-size", "1"),
    ],
    ids=["ddp", "fsdp-padding"],
)
def test_three_processes_on_uneven_rows_match_one(tmp_path, args):
    """2 prompts x 4 = 8 rows over 3 ranks (3/3/2): the second group spans ranks 0 to 2."""
    shape = ("--batch-size", "2", "--generations", "4", "--steps", "2", *args)
    one = _run(tmp_path / "one", 1, *shape)
    three = _run(tmp_path / "three", 3, *shape)
    initial = tiny.build_model(tiny.build_tokenizer(), seed=0).state_dict()
    assert any(not torch.equal(one[k], initial[k]) for k in one), "training changed nothing"
    for name in one:
        torch.testing.assert_close(three[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    m1, m3 = _metrics(tmp_path / "one"), _metrics(tmp_path / "three")
    assert m1["step"] == m3["step"] == 2
    assert m1["reward"] == pytest.approx(m3["reward"])
    assert m1["completion"] == pytest.approx(m3["completion"])
    assert m1["frac_reward_zero_std"] == m3["frac_reward_zero_std"]
    assert m1["loss"] == pytest.approx(m3["loss"], rel=1e-3, abs=1e-7)
    assert_same_steps(tmp_path / "one", tmp_path / "three")
