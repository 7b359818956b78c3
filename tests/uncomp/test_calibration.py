"""UNComp calibration: votes, stages, determinism, JSON round trip, shipped file, errors."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax.tools.uncomp_calibrate import calibrate, split_stages, vote_groups
from kvjax.uncomp.calibration import UNCompCalibration, load_calibration, shipped_calibration

CFG = dict(n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=101)


@pytest.fixture(scope="module")
def tiny():
    cfg = models.ModelConfig.tiny(**CFG)
    return models.Decoder(cfg, rngs=nnx.Rngs(2))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(0)
    return [list(rng.randint(1, 101, 48)) for _ in range(3)]


def test_vote_groups_two_and_n_groups():
    ent = np.array([[0.5, 0.1, 0.9, 0.3], [0.6, 0.2, 0.8, 0.1], [0.1, 0.3, 0.7, 0.2]])
    assert vote_groups(ent, 2) == ((1, 3), (0, 2))  # head 0 is high in 2 of 3 prompts
    assert vote_groups(ent, 4) == ((3,), (1,), (0,), (2,))  # rank sums h3 2, h1 3, h0 4, h2 9
    assert vote_groups(ent, 1) == ((0, 1, 2, 3),)
    with pytest.raises(ValueError, match="empty"):
        vote_groups(ent, 5)


def test_split_stages():
    assert split_stages([5.0, 4.5, 4.4, 3.0, 3.2, 3.1], 0.2) == (0, 1, 3)
    assert split_stages([1.0, 1.1, 1.2], 0.01) == (0,)


def test_calibrate_deterministic_partition_and_roundtrip(tiny, prompts):
    a = calibrate(tiny, None, prompts, k=8, groups=2, progress=False)
    b = calibrate(tiny, None, prompts, k=8, groups=2, progress=False)
    assert a == b
    assert a.model_signature == (3, 6, 3, tiny.config.head_dim)
    for groups in a.head_groups:
        assert sorted(h for g in groups for h in g) == [0, 1, 2] and len(groups) == 2
    assert UNCompCalibration.from_json(a.to_json()) == a
    three = calibrate(tiny, None, prompts, k=8, groups=3, progress=False)
    assert all(len(g) == 3 for g in three.head_groups)


def test_bad_inputs(tiny, prompts):
    with pytest.raises(ValueError, match="exceeds head_dim"):
        calibrate(tiny, None, prompts, k=tiny.config.head_dim + 1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        calibrate(tiny, None, prompts, k=8, groups=4, progress=False)
    cal = shipped_calibration()
    with pytest.raises(ValueError, match="not \\(3, 6, 3"):
        cal.check_model(3, 6, 3, 16)
    with pytest.raises(ValueError, match="version"):
        UNCompCalibration.from_json(cal.to_json().replace('"version": 1', '"version": 9'))
    with pytest.raises(ValueError, match="partition"):
        dataclasses.replace(cal, head_groups=((((0, 1), (1,)),) + cal.head_groups[1:]))


def test_shipped_smollm2_file():
    cal = load_calibration("smollm2")
    assert cal.model_signature == (30, 9, 3, 64) and cal.k == 32 and cal.n_groups == 2
    assert cal.stages[0] == 0 and len(cal.layer_entropy) == 30
    keep = cal.prefill_keep(1024)
    assert keep[0] is None and all(k is None for i, k in enumerate(keep) if i not in cal.stages)
    assert keep[cal.stages[-1]] == 384  # the last stage keeps min_len = 0.375 n


@pytest.mark.slow
def test_shipped_file_is_reproduced_by_the_command(tmp_path):
    """Tolerance: head groups and stages identical, entropies within 1e-3 (f32 on another
    XLA build or CPU may round differently; the shipped values carry 6 decimals)."""
    from kvjax.cli import main
    out = tmp_path / "cal.json"
    assert main(["uncomp-calibrate", "--model", "smollm2", "--out", str(out)]) == 0
    new, ship = load_calibration(out), shipped_calibration()
    assert new.prompt_sha256 == ship.prompt_sha256, "calibration prompts changed"
    assert new.head_groups == ship.head_groups and new.stages == ship.stages
    np.testing.assert_allclose(new.layer_entropy, ship.layer_entropy, atol=1e-3)
    np.testing.assert_allclose(new.head_entropy, ship.head_entropy, atol=1e-3)
