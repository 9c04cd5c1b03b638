"""The PyTorch peers of `lmu-jax bench --peers` (benchmarks/peers.py) are the same models and the same step:
equal parameter counts, and from our initial weights the same losses and parameters after a few steps."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks import peers
from benchmarks.suite import model_section, run_config

reason = peers.torch_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

STEPS = 3


def build(family, kjv_cache, **extra):
    from lmu_jax.train.loop import StepInputs, open_program

    model = model_section(family, 32, 2, "float32", **extra)  # the transformer: 2 heads of 16
    cfg = run_config(model, 16, 4, str(kjv_cache), 300_000)
    # a learning rate and decay large enough that a wrong decay set or clip shows in the parameters;
    # the clip is below the initial gradient norm, so it acts
    cfg = cfg.replace(optim=cfg.optim.__class__(lr=1e-2, warmup_steps=2, weight_decay=0.5, grad_clip=0.05))
    program, cache = open_program(cfg, [jax.devices()[0]])
    return program, StepInputs(program, cache)


@pytest.mark.parametrize("family,extra,onednn", [("transformer", {"positions": "learned"}, True),
                                                 ("lstm", {}, True), ("lstm", {}, False)])
def test_peer_matches_our_step(family, extra, onednn, kjv_cache):
    """onednn=False: torch.nn.LSTM's own per-time-step loop instead of oneDNN's RNN kernel, the same math."""
    program, inputs = build(family, kjv_cache, **extra)
    state = program.init_state()
    peer = peers.Peer(program, state, onednn=onednn)
    trainable = [t for t in peer.module.parameters() if t.requires_grad]
    assert sum(t.numel() for t in trainable) == program.counts["total"]

    ours, theirs = [], []
    for step in range(STEPS):
        (batch,) = inputs(step)
        state, metrics = program.train_step(state, batch)
        ours.append(float(metrics["loss"]))
        theirs.append(peer.step(np.asarray(batch)))
        if step == 0:
            assert float(metrics["grad_norm"]) > program.cfg.optim.grad_clip  # clipping is exercised
    np.testing.assert_allclose(theirs, ours, rtol=2e-5)
    assert ours[-1] < ours[0]  # the steps did something

    # after the steps the weights agree too: same AdamW, same decay set, same clipping
    expected = peers._flax_to_torch(peers.jax_to_numpy(state["params"]), program.model_cfg)
    for name, tensor in peer.module.named_parameters():
        if tensor.requires_grad:
            np.testing.assert_allclose(tensor.detach().numpy(), expected[name][0], atol=2e-5, err_msg=name)


def test_unsupported_options_are_refused(kjv_cache):
    program, _ = build("transformer", kjv_cache)  # rotary positions: the GPT peer has a learned table
    with pytest.raises(ValueError, match="positions=learned"):
        peers.torch_model(program.model_cfg)
