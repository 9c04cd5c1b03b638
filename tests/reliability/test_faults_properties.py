"""Property-based tests: the config parser (round trip; any input is a config or a UserError, never another
exception) and the batch permutation (every window once per epoch for any process count, and any step
recomputed from scratch -- a resume -- gives the same rows). tests/test_data_batches.py covers 1, 2 and 4
processes from step 0; here: any count, and resuming anywhere."""

import dataclasses
import typing

import numpy as np
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmu_jax.config import RunConfig, config_from_dict, dump_config, load_config, parse_override
from lmu_jax.data.pipeline import WindowBatcher
from lmu_jax.errors import UserError
from lmu_jax.models import FAMILIES

SECTIONS = {f.name: typing.get_type_hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)}
SECTIONS["model"] = FAMILIES["transformer"].config_cls
CHOICES = {  # string fields with a closed set of values
    "family": ["transformer"], "dtype": ["float32", "bfloat16"], "tokenizer": ["byte", "sentencepiece"],
    "sp_model_type": ["bpe", "unigram"], "schedule": ["cosine", "wsd", "constant"], "nonfinite": ["stop", "skip"],
    "positions": ["rope", "learned"], "coordinator": [""],
}
QUIET = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def field_values(name: str, kind) -> st.SearchStrategy:
    """Plausible values of one field's type (the parser decides which are valid)."""
    if name in CHOICES:
        return st.sampled_from(CHOICES[name])
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(-1, 4096)
    if kind is float:
        return st.floats(0, 2, allow_nan=False) | st.floats(1e-9, 1e6, allow_nan=False)
    return st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=12)


@st.composite
def raw_configs(draw) -> dict:
    raw = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        names = draw(st.lists(st.sampled_from(sorted(hints)), max_size=4, unique=True))
        raw[section] = {name: draw(field_values(name, hints[name])) for name in names}
    return raw


@settings(max_examples=150, **QUIET)
@given(raw_configs())
def test_every_valid_config_round_trips_through_yaml_and_overrides(tmp_path_factory, raw):
    try:
        cfg = config_from_dict(raw)
    except UserError:
        assume(False)
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    path = tmp_path_factory.mktemp("roundtrip") / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    overrides = [f"{section}.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for section, values in raw.items() for key, value in values.items()]
    assert load_config(None, overrides) == cfg  # the same settings typed on the command line


ANYTHING = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["transformer", "lstm", "1e3", "-1", ".nan", "skip", "bfloat16"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@st.composite
def hostile_configs(draw) -> dict:
    raw = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "bogus"]), max_size=4, unique=True)):
        hints = typing.get_type_hints(SECTIONS.get(section, RunConfig))
        keys = st.sampled_from(sorted(hints) + ["n_heads", "unknown_key"])
        raw[section] = draw(ANYTHING) if draw(st.booleans()) and draw(st.booleans()) else \
            {draw(keys): draw(ANYTHING) for _ in range(draw(st.integers(0, 3)))}
    return raw


@settings(max_examples=400, **QUIET)
@given(hostile_configs())
def test_any_input_is_a_config_or_a_user_error(raw):
    try:
        cfg = config_from_dict(raw)
    except UserError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert isinstance(cfg, RunConfig)


@settings(max_examples=200, **QUIET)
@given(st.text(max_size=40))
def test_any_override_text_parses_or_is_a_user_error(text):
    try:
        (section, key), _ = parse_override(text)
    except UserError:
        return
    assert section and key and "=" in text


def ramp(n_windows: int, seq_len: int) -> np.ndarray:
    return np.arange(n_windows * seq_len + 1, dtype=np.int64)  # a window's first token names it


@settings(max_examples=80, deadline=None)
@given(n_windows=st.integers(1, 50), local=st.integers(1, 5), processes=st.integers(1, 8),
       seed=st.integers(0, 2**31), seq_len=st.integers(1, 3), resume_epoch=st.integers(0, 9))
def test_each_window_once_per_epoch_for_any_process_count_and_any_resume(n_windows, local, processes, seed,
                                                                          seq_len, resume_epoch):
    batch = local * processes
    tokens = ramp(n_windows, seq_len)
    batcher = WindowBatcher(tokens, seq_len, batch, seed)

    def rows(b, step):  # what every process contributes to the global batch, in process order
        return np.concatenate([b.local_batch(step, p, processes) for p in range(processes)])

    steps = -(-(resume_epoch + 2) * n_windows // batch)  # through epoch resume_epoch + 1
    seen = np.concatenate([rows(batcher, s)[:, 0] // seq_len for s in range(steps)])
    for epoch in range(resume_epoch + 2):
        assert sorted(seen[epoch * n_windows:(epoch + 1) * n_windows]) == list(range(n_windows)), epoch
    # a fresh process (a resumed run) computes any step alone, after the original has moved on many epochs
    step = resume_epoch * n_windows // batch
    fresh = WindowBatcher(tokens, seq_len, batch, seed)
    np.testing.assert_array_equal(rows(fresh, step), rows(batcher, step))
    np.testing.assert_array_equal(rows(fresh, step)[:, 0] // seq_len, seen[step * batch:(step + 1) * batch])
