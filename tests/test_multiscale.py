"""Multi-scale transformer: causality for every topology, pooling factor and operator (lengths not
divisible by k), leak-free causal pooling, the retina key sets tile the past exactly once, the memory
model, FLOPs against XLA, and a few train steps."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmu_jax.cli import main as cli_main
from lmu_jax.config import config_from_dict
from lmu_jax.errors import UserError
from lmu_jax.flops import xla_flops
from lmu_jax.models.multiscale import (MultiscaleConfig, MultiscaleLM, causal_pool_blocks, forward_flops_per_token,
                                       memory_footprint, retina_mask)

from helpers import repeated_batch_losses

VOCAB, LENGTH = 21, 11  # 11: divisible by neither k = 2 nor k = 3


def tiny(**keys):
    defaults = dict(d_model=16, n_heads=2, d_ff=32)
    cfg = MultiscaleConfig(**{**defaults, **keys}).resolved(VOCAB, LENGTH)
    cfg.validate()
    return cfg


def init(cfg, seed=0):
    model = MultiscaleLM(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, LENGTH), jnp.int32), {})["params"])
    params["embed"]["embedding"] = params["embed"]["embedding"] * 25.0  # O(1) logits, so differences show
    return model, params


TOPOLOGIES = {
    "bottom_up k=2": dict(topology="bottom_up", pool_factor=2, scale_layers=(1, 1, 1)),
    "bottom_up k=3 two scales linear": dict(topology="bottom_up", pool_factor=3, scale_layers=(1, 1, 1, 1, 1),
                                            pool="linear", upsample="linear"),
    "bottom_up spans": dict(topology="bottom_up", pool_factor=2, scale_layers=(1, 1, 1), scale_spans=(3, 2, 3)),
    "top_down k=3 linear": dict(topology="top_down", pool_factor=3, scale_layers=(0, 1, 1), pool="linear",
                                upsample="linear"),
    "retina k=2": dict(topology="retina", n_layers=2, pool_factor=2, retina_spans=(2, 1, 0)),
    "retina k=3": dict(topology="retina", n_layers=1, pool_factor=3, retina_spans=(1, 1)),
}


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_causal_for_every_topology_and_pool_factor(name):
    model, params = init(tiny(**TOPOLOGIES[name]))
    apply = jax.jit(lambda variables, t: model.apply(variables, t, {})[0])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, LENGTH), 0, VOCAB)
    before = apply({"params": params}, tokens)
    for t in range(LENGTH - 1):
        changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 5) % VOCAB)
        after = apply({"params": params}, changed)
        np.testing.assert_array_equal(after[:, : t + 1], before[:, : t + 1], err_msg=f"t={t}")
    keys = TOPOLOGIES[name]
    if not keys.get("scale_spans") and keys.get("retina_spans", (0,))[-1] == 0:
        # unlimited reach: the first token still gets to the last position (coarse scales / pooled keys)
        far = apply({"params": params}, tokens.at[:, 0].set((tokens[:, 0] + 5) % VOCAB))
        assert np.abs(far[:, -1] - before[:, -1]).max() > 1e-5


def test_causal_pooling_sees_no_future():
    """Coarse position j averages tokens jk−k+1 .. jk (zeros before 0): the shift by k − 1."""
    positions = jnp.arange(1.0, 12.0)[None, :, None]  # token t holds t + 1, so padding (0) stands out
    blocks = np.asarray(causal_pool_blocks(positions, 3))[0, :, :, 0]
    assert blocks.tolist() == [[0, 0, 1], [2, 3, 4], [5, 6, 7], [8, 9, 10]]
    assert all(max(row) - 1 <= 3 * j for j, row in enumerate(blocks))  # newest token of block j is jk


@pytest.mark.parametrize("length,spans,factor", [(11, (2, 1, 0), 2), (40, (5, 2, 1), 3), (30, (3,), 2),
                                                 (33, (4, 2, 2, 0), 2)])
def test_retina_levels_tile_the_past_exactly_once(length, spans, factor):
    mask = retina_mask(length, spans, factor)
    sizes = [factor**level for level in range(len(spans))]
    counts = [-(-length // size) for size in sizes]
    assert mask.shape == (length, sum(counts))
    offsets = np.cumsum([0] + counts)
    for t in range(length):
        covered = np.zeros(length, int)
        for level, size in enumerate(sizes):
            for block in np.flatnonzero(mask[t, offsets[level]:offsets[level + 1]]):
                assert (block + 1) * size - 1 <= t  # complete, in the past (or t itself at level 0)
                covered[block * size:(block + 1) * size] += 1
        assert covered[t + 1:].sum() == 0 and covered.max() <= 1, (t, covered)  # no future, no overlap
        seen = np.flatnonzero(covered)  # one contiguous stretch ending at t: no gaps between levels
        assert seen[-1] == t and len(seen) == t - seen[0] + 1, (t, covered)
        if spans[-1] == 0:  # a last span of 0 reaches back to the first token
            assert seen[0] == 0
        assert mask[t, :length].sum() >= min(spans[0], t + 1)  # the w_0 most recent tokens at full resolution


def test_memory_model_counts_maps_at_each_scale():
    cfg = tiny(topology="bottom_up", pool_factor=4, scale_layers=(2, 8, 2), scale_spans=(64, 0, 64), n_heads=2)
    model = memory_footprint(cfg, batch=1, seq_len=256)
    # 4 fine layers: 256 queries x 64 keys; 8 coarse layers: 64 x 64
    assert model["attention_maps"] == 2 * (4 * 256 * 64 + 8 * 64 * 64)
    assert model["activations"] == 16 * (4 * 256 + 8 * 64)
    assert cfg.n_layers == 12


def test_config_keys_and_registry(capsys):
    cfg = config_from_dict({"model": {"family": "multiscale", "topology": "top_down", "scale_layers": [0, 4, 2],
                                      "n_heads": 2}}).model
    assert cfg.scale_layers == (0, 4, 2) and cfg.resolved(256, 64).n_layers == 6
    for bad in ({"topology": "top_down", "scale_layers": [1, 2, 1]}, {"scale_layers": [1, 2]},
                {"pool_factor": 1}, {"scale_spans": [1, 2]}, {"retina_spans": [0, 2]}, {"pool": "max"},
                {"n_heads": 3}):
        with pytest.raises(UserError):
            config_from_dict({"model": {"family": "multiscale", **bad}})
    assert cli_main(["flops", "--list"]) == 0
    assert "multiscale" in capsys.readouterr().out.split()


@pytest.mark.parametrize("keys", [dict(topology="bottom_up", pool_factor=2, scale_layers=(1, 2, 1), pool="linear",
                                       upsample="linear"),
                                  dict(topology="retina", n_layers=2, pool_factor=2, retina_spans=(8, 4, 0))])
def test_analytic_flops_match_xla(keys):
    """Forward FLOPs of the compiled model against the analytic count. XLA computes the full causal map
    and counts element-wise work; the analytic count halves causal maps (the convention)."""
    batch, length = 4, 32
    cfg = MultiscaleConfig(d_model=128, n_heads=4, **keys).resolved(256, length)
    model, tokens = MultiscaleLM(cfg), jnp.zeros((batch, length), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, {}))["params"])
    xla = xla_flops(jax.jit(lambda p, t: model.apply({"params": p}, t, {})[0]).lower(params, tokens).compile())
    analytic = forward_flops_per_token(cfg, length) * batch * length
    assert 0.95 < xla / analytic < 1.15, (xla, analytic)


@pytest.mark.parametrize("topology", ["bottom_up", "retina"])
def test_a_few_train_steps_lower_the_loss(topology):
    keys = TOPOLOGIES["bottom_up k=3 two scales linear" if topology == "bottom_up" else "retina k=2"]
    model, params = init(tiny(**keys))
    windows = jax.random.randint(jax.random.PRNGKey(2), (4, LENGTH + 1), 0, VOCAB)
    losses = repeated_batch_losses(model, params, windows, lr=1e-2, steps=6)
    assert all(math.isfinite(loss) for loss in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.15, losses


@pytest.mark.parametrize("topology", ["bottom_up", "retina"])
def test_sizes_with_the_solver(topology):
    from lmu_jax.flops import param_counts
    from lmu_jax.sizing import solve

    cfg = solve("multiscale", 100_000, base_cfg=MultiscaleConfig(topology=topology), seq_len=32).resolved(256, 32)
    cfg.validate()
    assert abs(param_counts(cfg, 32)["non_embedding"] / 100_000 - 1) <= 0.05


def test_experiment_configs_load():
    from lmu_jax.config import load_config

    from helpers import REPO

    configs = {name: load_config(REPO / "experiments" / "configs" / f"multiscale_{name}.yaml").model
               for name in ("bottom_up_30l", "retina_30l", "vanilla_14l")}
    assert configs["bottom_up_30l"].resolved(32000, 1024).n_layers == configs["retina_30l"].n_layers == 30
    assert configs["vanilla_14l"].n_layers <= 14  # "less than half the number of layers"
