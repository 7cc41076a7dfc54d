"""SFT with ``distributed.strategy: deepspeed_zero3``: the model is loaded only once the training arguments (and so
transformers' ZeRO-3 context) exist, so ``from_pretrained`` partitions the weights at load (``deepspeed.zero.Init``)
instead of every worker holding a full copy.

DeepSpeed is not installed here (and cannot run on a CPU), so two mocks stand in for it: transformers'
``HfTrainerDeepSpeedConfig`` (which needs DeepSpeed to be built) is replaced by accelerate's plain
``HfDeepSpeedConfig`` that registers itself in transformers' weakref exactly as the real one does, and accelerate's
``DeepSpeedPlugin`` by a mock. ``is_deepspeed_zero3_enabled()`` itself is transformers' real function: it answers
True only while the training arguments object is alive. ``from_pretrained`` is wrapped to record that answer and
then stops the phase (loading under ZeRO-3 would import DeepSpeed), so no model is loaded.
"""

from __future__ import annotations

from unittest import mock

import pytest
from accelerate.utils.deepspeed import HfDeepSpeedConfig
from transformers import AutoModelForCausalLM
from transformers.integrations import deepspeed as hf_deepspeed

from stages.sft.config import SFTPhase, SFTStageConfig
from stages.sft.trainer import training_args, unpartitioned_load
from stages.sft.worker import WorkerRun, _train_phase


class _FakeTrainerDeepSpeedConfig(HfDeepSpeedConfig):
    """Stands in for transformers' ``HfTrainerDeepSpeedConfig`` where DeepSpeed is missing: registers itself in the
    global weakref ``is_deepspeed_zero3_enabled`` reads (as the real one does) and skips the "auto" filling."""

    def __init__(self, config):
        hf_deepspeed.set_hf_deepspeed_config(self)
        super().__init__(config)

    def trainer_config_process(self, args, auto_find_batch_size: bool = False) -> None:
        pass


class _LoadReached(Exception):
    """Raised by the wrapped ``from_pretrained`` once it has recorded the ZeRO-3 state."""


@pytest.fixture
def no_deepspeed():
    """The mocks of the module docstring; the weakref is cleared afterwards so no state leaks into other tests."""
    with mock.patch.object(hf_deepspeed, "HfTrainerDeepSpeedConfig", _FakeTrainerDeepSpeedConfig), \
            mock.patch("accelerate.utils.DeepSpeedPlugin", mock.MagicMock()):
        yield
    hf_deepspeed.unset_hf_deepspeed_config()


def _run(strategy: str, tmp_path) -> WorkerRun:
    cfg = SFTStageConfig.model_validate({"model": "base", "distributed": {"strategy": strategy}})
    spec = {"config": cfg.model_dump(), "seed": 0, "use_gpu": True, "world_size": 2}
    return WorkerRun(cfg=cfg, spec=spec, work=tmp_path, is_main=True, bf16=False, tokenizer=None,
                     original_template=None, heldout_ds=None, windows=[])


def _zero3_state_at_load(run: WorkerRun) -> list[bool]:
    """Run phase 0 up to the model load; the ``is_deepspeed_zero3_enabled()`` answers seen by ``from_pretrained``."""
    seen: list[bool] = []

    def recording_from_pretrained(*args, **kwargs):
        seen.append(hf_deepspeed.is_deepspeed_zero3_enabled())
        raise _LoadReached

    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", side_effect=recording_from_pretrained), \
            pytest.raises(_LoadReached):
        _train_phase(run, 0, SFTPhase(tiers=[4]), [{"messages": []}], "base", {}, last=True)
    return seen


def test_zero3_context_exists_when_the_model_loads(no_deepspeed, tmp_path):
    assert not hf_deepspeed.is_deepspeed_zero3_enabled()
    assert _zero3_state_at_load(_run("deepspeed_zero3", tmp_path)) == [True]


def test_other_strategies_load_without_zero3(no_deepspeed, tmp_path):
    assert _zero3_state_at_load(_run("fsdp", tmp_path)) == [False]


def test_a_single_process_load_leaves_zero3_aside_and_restores_it(no_deepspeed, tmp_path):
    """The LoRA merge loads the base model in the main process only: that load must not be ZeRO-3's collective."""
    run = _run("deepspeed_zero3", tmp_path)
    args = training_args(run.cfg, run.spec, tmp_path / "trainer", False, 1, 0)
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    with unpartitioned_load():
        assert not hf_deepspeed.is_deepspeed_zero3_enabled()
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    del args
