"""Named RNG streams: the fold-in value of every place that draws noise from a `Keys`.

Each table is one level of the key tree (the step's base key -> Keys fields -> model -> stack ->
block -> layer -> MoE layer), so values only need to differ within a table. They are the
numbers the first runs used: changing one changes every later random draw, and with it the
pinned losses of tests/test_trainer.py.
"""

from __future__ import annotations

import enum


class KeyStream(enum.IntEnum):
    """The step's base key folded into the fields of `Keys` (training/steps.py)."""

    DROPOUT = 0
    JITTER = 1


class ModelStream(enum.IntEnum):
    """Transformer level: token-embedding dropout and the stacks (0 is unused)."""

    ENCODER_EMBEDDING = 1
    ENCODER = 2
    DECODER_EMBEDDING = 3
    DECODER = 4


# Stack level: block i (unscanned) is folded with i itself, so the stack's output dropout takes
# a value no block index reaches. Under scan the blocks get `jax.random.split` keys instead.
STACK_OUTPUT = 10_000


class LayerStream(enum.IntEnum):
    """Layer level: each sublayer, and the dropout on its residual branch."""

    SELF_ATTENTION = 0
    SELF_ATTENTION_RESIDUAL = 1
    CROSS_ATTENTION = 2
    CROSS_ATTENTION_RESIDUAL = 3
    FFN = 4
    FFN_RESIDUAL = 5


class MoeStream(enum.IntEnum):
    """MoE layer: folded into the FFN's keys (the dense FFN uses its dropout key as is)."""

    JITTER = 1
    EXPERT_DROPOUT = 2
    SECOND_EXPERT = 3  # Mesh TF top-2's sampled second expert (folded into the jitter key)
