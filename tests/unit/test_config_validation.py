"""Start-up validation: every bad value is rejected before any work, by a `ConfigError` whose message
names the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from nemo_rlp.config import ConfigError, ParallelConfig, load_config


# (overrides, the key the message must name, the value it must quote)
BAD = [
    # RLP: group size, thought length, EMA decay, clip range, sampling.
    (["rlp.group_size=1"], "rlp.group_size", "1"),
    (["rlp.max_thought_len=0"], "rlp.max_thought_len", "0"),
    (["rlp.ema_decay=1.0"], "rlp.ema_decay", "1.0"),
    (["rlp.ema_decay=0.0"], "rlp.ema_decay", "0.0"),
    (["rlp.eps_low=1.0"], "rlp.eps_low", "1.0"),
    (["rlp.eps_high=-0.1"], "rlp.eps_high", "-0.1"),
    (["rlp.temperature=0"], "rlp.temperature", "0"),
    (["rlp.top_p=0"], "rlp.top_p", "0"),
    (["rlp.top_k=-1"], "rlp.top_k", "-1"),
    (["rlp.kl_beta=-0.001"], "rlp.kl_beta", "-0.001"),
    (["rlp.contexts_per_step=0"], "rlp.contexts_per_step", "0"),
    (["rlp.rollout_mode=beam"], "rlp.rollout_mode", "'beam'"),
    (["rlp.logprob_source=teacher"], "rlp.logprob_source", "'teacher'"),
    (["rlp.num_minibatches=0"], "rlp.num_minibatches", "0"),
    # Trainer: steps, schedules (batch kinds and learning rate), optimizer, non-finite guard.
    (["trainer.steps=0"], "trainer.steps", "0"),
    (["trainer.schedule.ntp_per_cycle=0", "trainer.schedule.rlp_per_cycle=0"], "trainer.schedule.rlp_per_cycle", "0"),
    (["trainer.lr=0"], "trainer.lr", "0"),
    (["trainer.lr_decay_style=step"], "trainer.lr_decay_style", "'step'"),
    (["trainer.lr_decay_steps=0"], "trainer.lr_decay_steps", "0"),
    (["trainer.lr_warmup_steps=-1"], "trainer.lr_warmup_steps", "-1"),
    (["trainer.steps=10", "trainer.lr_warmup_steps=5000"], "trainer.lr_warmup_steps", "5000"),
    (["trainer.lr=1e-3", "trainer.min_lr=0.01"], "trainer.min_lr", "0.01"),
    (["trainer.adam_beta1=1.0"], "trainer.adam_beta1", "1.0"),
    (["trainer.adam_eps=0"], "trainer.adam_eps", "0"),
    (["trainer.clip_grad=-1"], "trainer.clip_grad", "-1"),
    (["trainer.max_consecutive_skips=0"], "trainer.max_consecutive_skips", "0"),
    # Data: missing paths, context bounds.
    (["data.corpus=/no/such/corpus.jsonl"], "data.corpus", "/no/such/corpus.jsonl"),
    (["data.tokenizer=/no/such/tokenizer.json"], "data.tokenizer", "/no/such/tokenizer.json"),
    (["data.format=indexed", "data.corpus=/no/such/prefix"], "data.corpus", "/no/such/prefix"),
    (["data.min_context=0"], "data.min_context", "0"),
    (["data.max_context=2"], "data.max_context", "4"),
    # Model and parallel sizes that do not fit the model.
    (["model.max_sequence_length=16"], "model.max_sequence_length", "16"),
    (["model=tiny_gpt", "model.hidden_size=65"], "model.hidden_size", "65"),
    (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size", "3"),
    (["parallel.pipeline_model_parallel_size=3"], "parallel.pipeline_model_parallel_size", "3"),
    (["parallel.tensor_model_parallel_size=0"], "parallel.tensor_model_parallel_size", "0"),
    (["parallel.backend=mpi"], "parallel.backend", "'mpi'"),
    # Checkpoints and preemption.
    (["checkpoint.every_steps=-1"], "checkpoint.every_steps", "-1"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last", "0"),
    (["checkpoint.resume=/no/such/checkpoints"], "checkpoint.resume", "/no/such/checkpoints"),
    (["checkpoint.signals=[SIGTERM,SIGFOO]"], "checkpoint.signals[1]", "SIGFOO"),
    (["checkpoint.signals=[SIGKILL]"], "checkpoint.signals[0]", "SIGKILL"),
    (["checkpoint.signals=[SIGTERM,SIGTERM]"], "checkpoint.signals", "SIGTERM"),
    # Logging.
    (["logging.log_every=0"], "logging.log_every", "0"),
]


@pytest.mark.parametrize("overrides, key, value", BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_bad_value_is_rejected_naming_key_value_and_allowed(overrides, key, value):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    message = str(err.value)
    assert message.startswith(f"{key}="), message  # the key first, then its value
    assert value in message, message
    assert "is not allowed: " in message and len(message.split("is not allowed: ")[1]) > 5, message


def test_there_are_at_least_twenty_bad_configurations():
    assert len(BAD) >= 20


@pytest.mark.parametrize(
    "overrides, key",
    [(["rlp.group_sise=4"], "group_sise"), (["trainer.max_consecutive_skips=many"], "trainer.max_consecutive_skips"),
     (["checkpoint.keep_lats=3"], "keep_lats")],
)
def test_unknown_keys_and_wrong_types_are_rejected_by_name(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides)


def test_parallel_sizes_that_do_not_divide_the_world_size_are_rejected():
    from nemo_rlp.parallel.distributed import check_layout

    with pytest.raises(ConfigError) as err:
        check_layout(ParallelConfig(tensor_model_parallel_size=2), world_size=3)
    assert "parallel.tensor_model_parallel_size=2" in str(err.value) and "world size 3" in str(err.value)
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_model_parallel_size=2"):
        check_layout(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), world_size=6)
    assert check_layout(ParallelConfig(tensor_model_parallel_size=2), world_size=4) == 2


def test_the_defaults_are_valid():
    cfg = load_config()
    assert cfg.checkpoint.resume == "auto" and cfg.checkpoint.signals == ["SIGTERM", "SIGUSR1", "SIGINT"]
    assert cfg.trainer.max_consecutive_skips >= 1
    # The demo: lr decays over the NTP warm-up; RLP at marked answers, evaluated on held-out ones.
    assert (cfg.trainer.lr_decay_style, cfg.trainer.lr_decay_steps) == ("linear", cfg.trainer.schedule.ntp_warmup_steps)
    assert cfg.data.rlp_positions == "marked" and cfg.eval.enabled and cfg.logging.report


