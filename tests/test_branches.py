"""Cooldown branches (train.branch_from): a wsd run's checkpoint continued with its optimizer state and
step to a shorter horizon; at the parent's own horizon the branch is the parent, bit for bit."""

import json

import jax
import numpy as np
import pytest

from lmu_jax.config import config_from_dict
from lmu_jax.errors import UserError
from lmu_jax.train.loop import Trainer
from lmu_jax.train.optim import cooldown_start

from helpers import tiny_config, train_losses

WSD = {"schedule": "wsd", "warmup_steps": 2, "decay_fraction": 0.5}


def cfg(cache, steps, branch_from="", at=(), **optim):
    return config_from_dict(tiny_config(cache, optim={**WSD, **optim},
                                        train={"steps": steps, "branch_from": branch_from},
                                        checkpoint={"every": 0, "keep": 1, "at": list(at)}))


@pytest.fixture(scope="module")
def parent(tmp_path_factory, kjv_cache):
    """A 12-step wsd run (cooldown from step 6) that keeps checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("branches")
    parent_cfg = cfg(kjv_cache, 12, at=(3, 6))
    trainer = Trainer(parent_cfg, root / "parent")
    trainer.train()
    steps = sorted(int(p.name) for p in (root / "parent" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6, 12]  # keep=1, but the branch points stay
    return root, jax.device_get(trainer.final_state["params"])


def test_branch_at_the_full_horizon_is_the_wsd_run_bitwise(parent, kjv_cache):
    root, parent_params = parent
    assert cooldown_start(config_from_dict(tiny_config(kjv_cache, optim=WSD)).optim, 12) == 6
    trainer = Trainer(cfg(kjv_cache, 12, branch_from="parent/checkpoints/6"), root / "full")
    trainer.train()
    params = jax.device_get(trainer.final_state["params"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(parent_params)))
    assert train_losses(root / "full") == train_losses(root / "parent")[6:]  # only the cooldown ran
    assert json.loads((root / "full" / "eval.json").read_text())["loss"] == \
        json.loads((root / "parent" / "eval.json").read_text())["loss"]


def test_branch_resumes_the_optimizer_state_and_counts_the_prefix(parent, kjv_cache):
    root, _ = parent
    branch_cfg = cfg(kjv_cache, 6, branch_from=str(root / "parent" / "checkpoints" / "3"))  # absolute path too
    trainer = Trainer(branch_cfg, root / "half")
    state = trainer.fresh_state()
    assert int(state["step"]) == 3
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
               if any(getattr(k, "name", None) in ("mu", "nu") for k in path)]
    assert moments and all(float(np.abs(np.asarray(m)).max()) > 0 for m in moments)
    trainer.train()
    assert [s for s, _ in train_losses(root / "half")] == [4, 5, 6]
    evaluation = json.loads((root / "half" / "eval.json").read_text())
    tokens_per_step = branch_cfg.train.batch_size * branch_cfg.data.seq_len
    assert evaluation["tokens"] == 6 * tokens_per_step  # the parent's prefix and its own cooldown
    assert evaluation["flops_model"] == pytest.approx(6 * tokens_per_step * evaluation["flops_per_token"])
    lrs = [json.loads(l)["lr"] for l in (root / "half" / "metrics.jsonl").read_text().splitlines()
           if json.loads(l)["kind"] == "train"]
    assert lrs[0] < 3e-3 and lrs == sorted(lrs, reverse=True)  # its own cooldown, from step 3


@pytest.mark.parametrize("changes, message", [
    ({"lr": 1e-3}, "a checkpoint of a run with this run's model, data, optimizer"),
    ({"schedule": "cosine"}, "optim.schedule='cosine' is invalid: wsd for a cooldown branch"),
])
def test_a_branch_that_is_not_its_parent_is_refused(parent, kjv_cache, changes, message):
    root, _ = parent
    with pytest.raises(UserError, match=message):
        Trainer(cfg(kjv_cache, 6, branch_from="parent/checkpoints/3", **changes), root / "bad").fresh_state()


def test_a_branch_point_inside_a_cooldown_is_refused(parent, kjv_cache):
    root, _ = parent
    with pytest.raises(UserError, match=r"start of this run's and its parent's cooldown \(step 3\)"):
        Trainer(cfg(kjv_cache, 6, branch_from="parent/checkpoints/6"), root / "late").fresh_state()
