"""Overrides for a training run small enough for a test: the tiny model, RLP and trainer groups (not
the demo's), 4 contexts x G=3 thoughts of at most 6 tokens, NTP batches of 4 x 32 tokens; no
TensorBoard, printed thoughts, report or held-out evaluation (tests/integration/test_demo.py runs those); no
checkpoint kept at the end of the warm-up (`checkpoint.keep_steps`), so that a test's checkpoints are
the ones its every_steps saves."""

TINY_RUN = [
    "model=tiny_hybrid",
    "rlp=tiny",
    "trainer=tiny",
    "rlp.group_size=3",
    "rlp.max_thought_len=6",
    "rlp.contexts_per_step=4",
    "trainer.ntp_batch_size=4",
    "data.ntp_seq_len=32",
    "data.max_context=32",
    "logging.tensorboard=false",
    "logging.show_thoughts=0",
    "logging.report=false",
    "eval=none",
    "checkpoint.keep_steps=[]",
]
