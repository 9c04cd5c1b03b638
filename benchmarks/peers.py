"""PyTorch peers of the `transformer` and `lstm` families: the same model, the same step, to time ours against.

    lmu-jax bench --peers      (the `peers` extra installs PyTorch: pip install -e ".[peers]")

A peer is what a user would write in PyTorch instead: a GPT of the same pre-norm blocks (one fused QKV
projection, ``scaled_dot_product_attention``, tanh-GELU MLP, learned positions, tied embedding) and an
LSTM LM on ``torch.nn.LSTM``, trained by ``torch.optim.AdamW`` after ``clip_grad_norm_``. Faithful means:

* the same parameters, copied from our Flax initial parameters (``load_flax_params``), so the same
  count and the same FLOPs: every matmul of ours is a matmul of theirs, of the same shape;
* the same loss (mean next-token cross-entropy in float32) and the same optimizer work: AdamW with our
  b1, b2, eps, decoupled weight decay on exactly the tensors ours decays (our ``ndim >= 2`` rule,
  applied to our leaves: the attention biases, (heads, head_dim), and the LSTM's (4, d) bias are
  decayed), our learning rate at each step, global-norm clipping at ``optim.grad_clip``.

``torch.nn.LSTM`` has two gate biases per layer (b_ih + b_hh) where ours has one: the peer's b_hh is
held at zero and frozen (``requires_grad=False``), so the trained parameters are ours one for one.
On CPU, float32, ``torch.nn.LSTM`` runs oneDNN's fused RNN primitive (one library kernel per layer,
forward and backward); with ``onednn=False`` the peer runs PyTorch's own per-time-step loop instead
(``torch.backends.mkldnn`` off), the path of any LSTM variant that oneDNN does not implement. The bench
times the LSTM both ways, so that the table separates that one kernel from the rest.
tests/test_peers.py checks the counts and that two steps from the same weights give our losses.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

PEER_FAMILIES = ("transformer", "lstm")


def torch_available() -> str | None:
    """None when PyTorch imports, else why not (the peers are optional)."""
    try:
        import torch  # noqa: F401
    except ImportError as error:
        return f"PyTorch is not installed ({error}); pip install -e '.[peers]'"
    return None


def torch_matmul_gflops(rows: int, inner: int, cols: int, repeats: int = 3) -> float:
    """Best-of-`repeats` GFLOP/s of a float32 (rows x inner) @ (inner x cols) ``torch.mm`` here: the same
    shapes as ``benchmarks.suite.measure_model_matmuls`` times in XLA, so the two dot libraries compare
    directly."""
    import torch

    from benchmarks.suite import best_time

    generator = torch.Generator().manual_seed(0)
    x, w = (torch.randn(shape, generator=generator) for shape in ((rows, inner), (inner, cols)))
    return 2.0 * rows * inner * cols / best_time(torch.mm, x, w, repeats=repeats) / 1e9


def _modules():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, d, heads, d_ff, eps):
            super().__init__()
            self.heads = heads
            self.norm_attn, self.norm_mlp = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.up, self.down = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

        def forward(self, x):
            batch, time_, d = x.shape
            q, k, v = (t.view(batch, time_, self.heads, d // self.heads).transpose(1, 2)
                       for t in self.qkv(self.norm_attn(x)).split(d, dim=-1))
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(attended.transpose(1, 2).reshape(batch, time_, d))
            return x + self.down(F.gelu(self.up(self.norm_mlp(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            d = cfg.d_model
            self.embedding = nn.Embedding(cfg.vocab_size, d)
            self.positions = nn.Parameter(torch.zeros(cfg.max_len, d))
            self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.ff_width, LAYER_NORM_EPS)
                                        for _ in range(cfg.n_layers))
            self.norm_out = nn.LayerNorm(d, eps=LAYER_NORM_EPS)

        def forward(self, tokens):
            x = self.embedding(tokens) + self.positions[: tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.norm_out(x) @ self.embedding.weight.T  # tied output projection

    class LSTMLM(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            d = cfg.d_model
            self.scale = math.sqrt(d)
            self.embedding = nn.Embedding(cfg.vocab_size, d)
            self.lstm = nn.LSTM(d, d, num_layers=cfg.n_layers, batch_first=True)
            for layer in range(cfg.n_layers):  # one gate bias per layer, as ours: b_hh stays zero
                b_hh = getattr(self.lstm, f"bias_hh_l{layer}")
                b_hh.requires_grad_(False)
                with torch.no_grad():
                    b_hh.zero_()
            self.norm_out = nn.LayerNorm(d, eps=LAYER_NORM_EPS)

        def forward(self, tokens):
            x, _ = self.lstm(self.embedding(tokens) * self.scale)
            return self.norm_out(x) @ self.embedding.weight.T

    return {"transformer": GPT, "lstm": LSTMLM}


LAYER_NORM_EPS = 1e-6  # flax.linen.LayerNorm's default (torch's is 1e-5)


def check_supported(model_cfg) -> None:
    """The peers mirror our defaults of the two families, not every option of them."""
    family = model_cfg.family
    if family not in PEER_FAMILIES:
        raise ValueError(f"no PyTorch peer for family {family!r} (peers: {', '.join(PEER_FAMILIES)})")
    if not model_cfg.tie_embeddings or model_cfg.dtype != "float32":
        raise ValueError("the peers are float32 models with tied embeddings")
    if family == "transformer" and model_cfg.positions != "learned":
        raise ValueError("the GPT peer has learned positions: use model.positions=learned")
    if family == "lstm" and model_cfg.d_proj:
        raise ValueError("the torch.nn.LSTM peer has no projection (model.d_proj=0)")


def torch_model(model_cfg):
    """The PyTorch peer of a resolved model config (its parameters still to be loaded)."""
    check_supported(model_cfg)
    return _modules()[model_cfg.family](model_cfg)


def _flax_to_torch(p, model_cfg) -> dict[str, tuple[np.ndarray, bool]]:
    """torch parameter name -> (value, decayed) from our parameter tree `p` (numpy); `decayed` is our
    optimizer's weight-decay rule (``ndim >= 2``) on the leaves the tensor is made of."""
    mapped = {"embedding.weight": (p["embed"]["embedding"], True)}

    def norm(prefix, tree):
        ln = tree["LayerNorm_0"]
        return {f"{prefix}.weight": (ln["scale"], False), f"{prefix}.bias": (ln["bias"], False)}

    mapped.update(norm("norm_out", p["norm_out"]))
    if model_cfg.family == "transformer":
        d = model_cfg.d_model
        mapped["positions"] = (p["pos_embedding"], True)
        for i in range(model_cfg.n_layers):
            block, name = p[f"block_{i}"], f"blocks.{i}"
            attn = block["attn"]
            qkv = [attn[k] for k in ("query", "key", "value")]
            mapped[f"{name}.qkv.weight"] = (np.concatenate([t["kernel"].reshape(d, d) for t in qkv], 1).T, True)
            mapped[f"{name}.qkv.bias"] = (np.concatenate([t["bias"].reshape(d) for t in qkv]), True)  # (heads, kv)
            mapped[f"{name}.out.weight"] = (attn["out"]["kernel"].reshape(d, d).T, True)
            mapped[f"{name}.out.bias"] = (attn["out"]["bias"], False)
            for side in ("up", "down"):
                dense = block["mlp"][side]["Dense_0"]
                mapped[f"{name}.{side}.weight"] = (dense["kernel"].T, True)
                mapped[f"{name}.{side}.bias"] = (dense["bias"], False)
            mapped.update(norm(f"{name}.norm_attn", block["norm_attn"]))
            mapped.update(norm(f"{name}.norm_mlp", block["norm_mlp"]))
    else:
        for i in range(model_cfg.n_layers):
            layer = p[f"layers_{i}"]
            d_in = layer["input_kernel"].shape[0]
            mapped[f"lstm.weight_ih_l{i}"] = (layer["input_kernel"].reshape(d_in, -1).T, True)
            mapped[f"lstm.weight_hh_l{i}"] = (layer["recurrent_kernel"].reshape(d_in, -1).T, True)
            mapped[f"lstm.bias_ih_l{i}"] = (layer["bias"].reshape(-1), True)  # ours is (4, d): decayed
    return mapped


def load_flax_params(module, params, model_cfg) -> list[bool]:
    """Copy our Flax parameters into the peer; returns, per trainable torch parameter in
    ``module.parameters()`` order, whether our optimizer decays it."""
    import torch

    mapped = _flax_to_torch(jax_to_numpy(params), model_cfg)
    trainable = {name: t for name, t in module.named_parameters() if t.requires_grad}
    if set(trainable) != set(mapped):
        raise ValueError(f"parameters differ: torch only {sorted(set(trainable) - set(mapped))}, "
                         f"ours only {sorted(set(mapped) - set(trainable))}")
    with torch.no_grad():
        for name, tensor in trainable.items():
            value = torch.tensor(mapped[name][0], dtype=torch.float32)
            if value.shape != tensor.shape:
                raise ValueError(f"{name}: ours {tuple(value.shape)}, torch {tuple(tensor.shape)}")
            tensor.copy_(value)
    return [mapped[name][1] for name, t in module.named_parameters() if t.requires_grad]


def jax_to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, jax.device_get(tree))


def torch_optimizer(module, decayed: list[bool], optim_cfg):
    """AdamW with our hyper-parameters, weight decay on the tensors ours decays (the rate is set per step)."""
    import torch

    params = [t for t in module.parameters() if t.requires_grad]
    groups = [{"params": [t for t, d in zip(params, decayed) if d], "weight_decay": optim_cfg.weight_decay},
              {"params": [t for t, d in zip(params, decayed) if not d], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps)


def torch_train_step(module, optimizer, windows, lr: float, grad_clip: float) -> float:
    """One step as ours: loss of windows[:, 1:] given windows[:, :-1], backward, clip, AdamW at `lr`."""
    import torch
    from torch.nn import functional as F

    logits = module(windows[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([t for t in module.parameters() if t.requires_grad], grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss.detach()


class Peer:
    """A peer of a run's program (lmu_jax/train/builder.py): our initial parameters, our optimizer settings."""

    def __init__(self, program, state, compile_: bool = False, onednn: bool = True):
        import torch

        self.onednn = onednn
        self.module = torch_model(program.model_cfg)
        decayed = load_flax_params(self.module, state["params"], program.model_cfg)
        self.optimizer = torch_optimizer(self.module, decayed, program.cfg.optim)
        self.schedule, self.grad_clip = program.schedule, program.cfg.optim.grad_clip
        self.forward = torch.compile(self.module) if compile_ else self.module
        self.step_count = 0

    def step(self, batch) -> float:
        import torch

        windows = torch.from_numpy(np.asarray(batch, dtype=np.int64))
        lr = float(self.schedule(self.step_count))
        self.step_count += 1
        with torch.backends.mkldnn.flags(enabled=self.onednn):
            return float(torch_train_step(self.forward, self.optimizer, windows, lr, self.grad_clip))


# The peer's ops that are a matmul or a library kernel around matmuls (attention, oneDNN's RNN layer)
PEER_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::mkldnn_rnn_layer",
                "aten::mkldnn_rnn_layer_backward")


def profile_peer(cfg, devices, steps: int = 6, top: int = 4) -> dict:
    """The PyTorch eager peer of `cfg`'s program: its median step time over `steps`, then two steps under
    ``torch.profiler``, split into the shares of that wall time spent in PEER_KERNELS (``matmul_share``), in
    all other ops (self time: eager runs one op at a time) and in neither (Python between ops), and the
    `top` other ops."""
    import jax
    from torch.profiler import ProfilerActivity, profile

    from lmu_jax.train.loop import StepInputs, open_program

    program, cache = open_program(cfg, devices)
    batch = np.asarray(jax.device_get(StepInputs(program, cache)(0)[0]))
    peer = Peer(program, program.init_state())
    for _ in range(2):  # warm-up
        peer.step(batch)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        peer.step(batch)
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as traced:
        start = time.perf_counter()
        for _ in range(2):
            peer.step(batch)
        wall_us = (time.perf_counter() - start) * 1e6
    self_us = {event.key: event.self_cpu_time_total for event in traced.key_averages()}
    kernels = sum(us for key, us in self_us.items() if key in PEER_KERNELS)
    others = sorted(((us, key) for key, us in self_us.items() if key not in PEER_KERNELS), reverse=True)
    other = sum(us for us, _ in others)
    return {"step_s": statistics.median(times), "matmul_share": kernels / wall_us, "other_share": other / wall_us,
            "none_share": max(0.0, 1 - (kernels + other) / wall_us),
            "top_other_ms": {key: us / 2e3 for us, key in others[:top]}}


def compare(cfg, devices, rounds: int, compile_: bool) -> dict:
    """Our Trainer's jitted step against the PyTorch peer (eager, and compiled with `compile_`), from the
    same initial weights on the same batches, interleaved: each round runs one step of every side, so
    load that comes and goes falls on all alike; each side's time is its median over the rounds."""
    import jax
    import torch

    from lmu_jax.train.loop import StepInputs, open_program

    program, cache = open_program(cfg, devices)
    state = program.init_state()
    inputs = StepInputs(program, cache)
    batches = [inputs(i) for i in range(4)]
    host_batches = [np.asarray(jax.device_get(b[0])) for b in batches]
    peers = {"torch_eager": Peer(program, state)}
    if program.model_cfg.family == "lstm":
        peers["torch_eager_no_onednn"] = Peer(program, state, onednn=False)
    if compile_:
        peers["torch_compile"] = Peer(program, state, compile_=True)
    compiled = program.train_step.lower(state, *batches[0]).compile()
    state, metrics = compiled(state, *batches[0])  # warm-up
    jax.block_until_ready(state)
    point = {"params": program.counts["total"], "flops_per_token": program.flops_per_token,
             "tokens_per_step": program.tokens_per_step, "microbatches": program.cfg.train.microbatches,
             "torch_params": sum(t.numel() for t in peers["torch_eager"].module.parameters() if t.requires_grad),
             "torch_threads": torch.get_num_threads()}
    started = time.perf_counter()
    for peer in peers.values():
        peer.step(host_batches[0])  # warm-up (torch.compile compiles here)
    point["torch_warmup_s"] = time.perf_counter() - started
    times = {"ours": [], **{name: [] for name in peers}}
    for r in range(rounds):
        batch_index = (r + 1) % len(batches)
        start = time.perf_counter()
        state, metrics = compiled(state, *batches[batch_index])
        jax.block_until_ready((state, metrics))
        times["ours"].append(time.perf_counter() - start)
        for name, peer in peers.items():
            start = time.perf_counter()
            peer.step(host_batches[batch_index])
            times[name].append(time.perf_counter() - start)
    for name, samples in times.items():
        point[f"{name}_step_s"] = statistics.median(samples)
        point[f"{name}_steps_s"] = samples
    for name in peers:
        point[f"ours_over_{name}"] = point["ours_step_s"] / point[f"{name}_step_s"]
    return point
