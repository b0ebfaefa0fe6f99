"""The policy registry: each policy module declares its own entry, the package only collects them,
and a policy's options are its score function's keyword defaults."""
from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

import ea_local.policies as policies_pkg
from ea_local.policies import POLICIES, common, expected_attention, snapkv
from ea_local.policies.base import Policy

from .test_policies import make_view

NOT_POLICIES = {"base", "common"}  # the interface and the shared helpers


def policy_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(policies_pkg.__path__) if m.name not in NOT_POLICIES)


@pytest.mark.parametrize("module", policy_modules())
def test_every_policy_module_declares_the_entry_the_registry_holds(module):
    mod = importlib.import_module(f"ea_local.policies.{module}")
    entry = mod.POLICY
    assert isinstance(entry, Policy)
    assert POLICIES[entry.name] is entry
    assert entry.score is mod.score  # the entry names its own module's formula


def test_registry_holds_exactly_the_declared_entries():
    declared = {importlib.import_module(f"ea_local.policies.{m}").POLICY.name for m in policy_modules()}
    assert declared == set(POLICIES)
    assert next(iter(POLICIES)) == "expected-attention"  # listed first by `ea-local policies`


def test_options_are_the_score_functions_keyword_defaults():
    ea = POLICIES["expected-attention"].options
    assert ea["aggregate"] == "union" and ea["n_future_positions"] == 512 and ea["n_sink"] == 4
    assert ea["kernel_size"] == 1 and ea["layers"] is None
    assert POLICIES["snapkv"].options == {"window_size": None, "kernel_size": 5, "pooling": "max",
                                          "aggregate": "mean", "layers": None}
    assert POLICIES["none"].options == {} and POLICIES["streaming-llm"].options == {}


@pytest.mark.parametrize("name", sorted(set(POLICIES) - {"none"}))
def test_declared_defaults_score_like_no_options(name):
    p = POLICIES[name]
    view = make_view(layers=(0, 3), next_pos=36 if p.lookahead else None)
    np.testing.assert_array_equal(p.score(view, **p.options), p.score(view))


def test_a_changed_option_changes_the_scores():
    # guards the test above: passing options reaches the formula
    view = make_view(layers=(0, 3))
    p = POLICIES["expected-attention"]
    assert not np.array_equal(p.score(view, **{**p.options, "aggregate": "mean"}), p.score(view))


def test_shared_helpers_live_in_common():
    for name in ("softmax", "use_layers", "aggregate_scores", "pool1d", "kv_group"):
        assert getattr(expected_attention, name) is getattr(common, name)
    assert snapkv.pool1d is common.pool1d and snapkv.softmax is common.softmax


def test_cli_lists_each_policys_options():
    r = subprocess.run([sys.executable, "-m", "ea_local.cli", "policies"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "options: n_future_positions=512, " in r.stdout and "aggregate='union'" in r.stdout
    assert "options: seed=None" in r.stdout  # random
