"""transformers' own distributed test mixins (expert parallel, FSDP, tensor parallel) run against our classes.

The mixins come from the sdist of the installed transformers version, like the common tests of
``test_transformers_conformance.py`` (see ``tests/_transformers_tests.py``; the module is skipped, with the reason,
when they cannot be fetched). Their multi-process harness, ``distributed_testing_utils``, is not in the sdist: the
stand-in of ``_transformers_tests`` runs every rank as a spawned CPU process over gloo.

What this module changes around them, nothing inside them:

* the tester is the conformance tester (same tiny config: 8 routed experts in 2 groups, a dense first layer and an
  MoE layer), with ``causal_lm_class`` naming our ``DeepseekV3ForCausalLM``, the class the mixins shard;
* their allowlists of model types (``EP_/FSDP_/TP_DISTRIBUTED_TEST_MODEL_TYPES``) gain ``deepseek_v3`` for the
  duration of each test, and ``RUN_EXPERT_PARALLEL_TESTS`` / ``RUN_FSDP_TESTS`` / ``RUN_TENSOR_PARALLEL_TESTS`` are
  on unless the environment turns them off;
* :data:`NOT_RUN` lists the mixin tests left out here, each with its reason.

The mixins skip by themselves what this machine cannot run: the quantized TP generation without torchao, and
the tests that need more ranks than there are CPUs (HSDP, the 2-D EP mesh, EP with sharded experts: 4 and 8
ranks). Those pass on 2 cores too with one process per rank; ``MODELING_DEEPSEEK_V3_OVERSUBSCRIBE_RANKS=1`` runs
them (about a minute more), they are not in the default run for time.

The ranks fork from a server that has imported torch and transformers (see ``_transformers_tests``); without it
each launch costs seconds of imports per rank. Runtime: about 70 s on 2 busy cores (26 of the mixins' 33 tests
run, 7 skip).
"""

from __future__ import annotations

import fnmatch
import math
import os
import time
import unittest
import warnings

import pytest
import transformers

for _flag in ("RUN_EXPERT_PARALLEL_TESTS", "RUN_FSDP_TESTS", "RUN_TENSOR_PARALLEL_TESTS"):
    os.environ.setdefault(_flag, "1")  # read by transformers.testing_utils when it is first imported

import _transformers_tests  # noqa: E402

try:
    _transformers_tests.load()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        _tp = _transformers_tests.import_module("test_tensor_parallel_mixin")
        _ep = _transformers_tests.import_module("test_expert_parallel_mixin")
        _fsdp = _transformers_tests.import_module("test_fsdp_mixin")
except _transformers_tests.TransformersTestsUnavailable as exc:
    pytest.skip(
        f"transformers {transformers.__version__}'s distributed test mixins are unavailable: {exc}",
        allow_module_level=True,
    )

from test_transformers_conformance import DeepseekV3ConformanceTester  # noqa: E402
from test_transformers_conformance import _skip as _not_run  # noqa: E402

import modeling_deepseek_v3  # noqa: E402

MODEL_TYPE = modeling_deepseek_v3.DeepseekV3Config.model_type
ALLOWLISTS = (
    (_ep, "EP_DISTRIBUTED_TEST_MODEL_TYPES"),
    (_fsdp, "FSDP_DISTRIBUTED_TEST_MODEL_TYPES"),
    (_tp, "TP_DISTRIBUTED_TEST_MODEL_TYPES"),
)

OVERSUBSCRIBE_ENV = "MODELING_DEEPSEEK_V3_OVERSUBSCRIBE_RANKS"

# Mixin tests not run here, {test name or fnmatch pattern: reason}.
NOT_RUN: dict[str, str] = {}


class DistributedMixinTester(DeepseekV3ConformanceTester):
    """The conformance tester plus the class the distributed mixins load, shard and compare."""

    causal_lm_class = modeling_deepseek_v3.DeepseekV3ForCausalLM
    base_model_class = modeling_deepseek_v3.DeepseekV3Model


class DeepseekV3DistributedMixinsTest(
    _ep.ExpertParallelTesterMixin, _tp.TensorParallelTesterMixin, _fsdp.FSDPTesterMixin, unittest.TestCase
):
    """transformers' EP, TP and FSDP tests on our classes, each rank a CPU process."""

    all_model_classes = (modeling_deepseek_v3.DeepseekV3Model, modeling_deepseek_v3.DeepseekV3ForCausalLM)
    model_tester = None  # the mixins declare it abstract; setUp sets the instance's

    def setUp(self):
        self.model_tester = DistributedMixinTester(self, modeling_deepseek_v3.DeepseekV3Config)
        for module, name in ALLOWLISTS:
            allowed = getattr(module, name)
            if allowed is not None and MODEL_TYPE not in allowed:
                setattr(module, name, allowed | {MODEL_TYPE})
                self.addCleanup(setattr, module, name, allowed)

    def _skip_if_insufficient_devices(self, world_size):
        if os.environ.get(OVERSUBSCRIBE_ENV) == "1":
            return  # CPU ranks may share cores: slower, same results
        super()._skip_if_insufficient_devices(world_size)


for _name in sorted(dir(DeepseekV3DistributedMixinsTest)):
    if _name.startswith("test_"):
        for _pattern, _reason in NOT_RUN.items():
            if fnmatch.fnmatchcase(_name, _pattern):
                setattr(DeepseekV3DistributedMixinsTest, _name, _not_run(_reason)(getattr(DeepseekV3DistributedMixinsTest, _name)))
                break


def test_not_run_names_existing_tests():
    """Every entry of :data:`NOT_RUN` still names a mixin test (catches renames between transformers versions)."""
    names = [name for name in dir(DeepseekV3DistributedMixinsTest) if name.startswith("test_")]
    for pattern in NOT_RUN:
        assert any(fnmatch.fnmatchcase(n, pattern) for n in names), pattern


def test_the_mixins_auto_loads_build_our_class(tmp_path):
    """The FSDP mixin builds and reloads its models through ``AutoModelForCausalLM``: that must give our class
    (``import modeling_deepseek_v3`` registers it for the model type), not transformers' own."""
    config = DistributedMixinTester(None, modeling_deepseek_v3.DeepseekV3Config).get_config()
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model) is modeling_deepseek_v3.DeepseekV3ForCausalLM
    model.save_pretrained(tmp_path)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)) is modeling_deepseek_v3.DeepseekV3ForCausalLM


# -- the stand-in harness itself: a rank's failure must fail the caller, with that rank's traceback -----------------

_harness = _transformers_tests.import_module("distributed_testing_utils")


def test_harness_runs_every_rank_in_a_process_group():
    _harness.run_distributed(world_size=2)(math.sqrt)()  # math.sqrt(rank) on ranks 0 and 1: no error


def test_harness_reports_the_failing_rank_with_its_traceback():
    # math.log(rank) fails on rank 0 only
    with pytest.raises(_transformers_tests.RankFailure, match=r"(?s)rank 0 of 2 raised.*Traceback.*ValueError: math domain error"):
        _harness.run_distributed(world_size=2)(math.log)()


def test_harness_reports_a_rank_that_dies():
    # os._exit(rank): rank 1 exits with status 1 before any Python error can be reported
    with pytest.raises(_transformers_tests.RankFailure, match=r"rank 1 of 2 died \(exit code 1"):
        _harness._start_rank_processes(os._exit, args=(), nprocs=2)


def test_harness_stops_a_rank_that_outlives_the_timeout(monkeypatch):
    # time.sleep(rank): rank 1 cannot be done before 1 s, the deadline is at 0.5 s
    monkeypatch.setenv(_transformers_tests.RANK_TIMEOUT_ENV, "0.5")
    with pytest.raises(_transformers_tests.RankFailure, match=r"rank\(s\) \[.*1\] still running after 0.5 s"):
        _harness._start_rank_processes(time.sleep, args=(), nprocs=2)
