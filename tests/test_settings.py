"""Typed settings: one constructor (parse_config), variants by replace, and what --resume compares."""
import dataclasses

import pytest

from bench.config import parse_config, saved_settings
from bench.errors import ConfigError
from bench.settings import GROUP_OF, STUDY
from bench.variants import Variant


def test_a_variant_is_a_replace_and_the_settings_are_frozen():
    s = parse_config(["--profile", "smoke", "--unfreeze", "1,3"]).settings
    v = Variant("unfreeze-3", "depth", {"unfreeze": 3, "lr": 0.5})
    c = v.apply(s)
    assert (c.model.unfreeze, c.train.lr) == (3, 0.5) and (s.model.unfreeze, s.train.lr) == ("1,3", 2e-3)
    assert c.data is s.data  # untouched groups are shared, not copied
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.train.lr = 1.0
    with pytest.raises(ConfigError, match="unknown settings: not_a_setting"):
        s.replace(not_a_setting=1)


def test_every_flag_is_a_setting_or_a_command():
    from bench.config import ALIASES, COMMANDS, get_args_parser
    dests = {a.dest for a in get_args_parser()._actions} - {"help"}
    assert dests - set(GROUP_OF) == set(COMMANDS) | set(ALIASES)
    assert set(GROUP_OF) - dests == {"variant_specs"}  # a profile's [[variants]] tables


def test_study_is_what_the_figures_depend_on():
    s = parse_config(["--profile", "smoke", "--out", "x", "--trace-steps", "5"]).settings
    study = s.study()
    assert {"out", "trace_steps", "data_dir", "profile", "parallel"}.isdisjoint(study)
    assert {"model", "batch_size", "precision", "unfreeze", "variant_specs"} <= set(study) == STUDY


def test_saved_settings_fill_what_an_older_run_did_not_store():
    s = parse_config(["--profile", "smoke"]).settings
    old = {k: v for k, v in s.flat().items() if k != "compile_backend"}
    assert saved_settings({**old, "rank": 0, "ceiling_tflops": 1.0}) == s  # run-time state is ignored
