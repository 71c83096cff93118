"""A variant's chat data, from its sources to the arrays training reads, every check done first.

For SFT: each source read (tasks/sft/reading.py), its bad rows held against
`sft.max_bad_fraction`, the conversations split train/val by a hash of their position (as prepare
splits documents), rendered and tokenized with the variant's template, length policy applied,
then packed or padded into rows of `max_length`. For DPO the same with preference pairs, whose
chosen and rejected sequences become two padded row sets. Any problem is a `UserError` naming the
field, raised before a single training step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from model.chat import template
from model.tokenizer import Tokenizer
from tasks.data.packing import is_val
from tasks.errors import UserError
from tasks.params import Params, VariantParams
from tasks.sft.reading import check_bad_fraction, read_source
from tasks.sft.rows import pack, pad
from tasks.sft.sequences import Encoded, Encoder


@dataclass(frozen=True)
class TrainingSet:
    arrays: dict[str, np.ndarray]   # what the workers load (loader.save_arrays)
    items: int                      # training rows (SFT) or pairs (DPO)
    summary: dict                   # for the metrics: sources, rows read, skipped by reason, split sizes


def where(variant: VariantParams, dpo: bool = False) -> str:
    return f"sft.variants[{variant.name}]" + (".dpo" if dpo else "")


def _read_all(params: Params, variant: VariantParams, dpo: bool) -> tuple[list, dict]:
    field = where(variant, dpo)
    sources = variant.dpo.sources if dpo else variant.sources
    examples, summary = [], {}
    for source in sources:
        read = read_source(source, f"{field}.sources[{source.name}]", params, preference=dpo)
        check_bad_fraction(read, f"{field}.sources[{source.name}]", params.sft.max_bad_fraction)
        examples += read.examples
        summary[source.name] = read.summary()
    return examples, summary


def _split(examples: list, val_fraction: float) -> tuple[list, list]:
    """Held-out examples by a hash of their index; at least one when a fraction is asked for."""
    val = (is_val(np.arange(len(examples), dtype=np.uint64), val_fraction) if val_fraction
           else np.zeros(len(examples), bool))
    if val_fraction and not val.any() and len(examples) > 1:
        val[-1] = True
    return [e for e, v in zip(examples, val) if not v], [e for e, v in zip(examples, val) if v]


def _counts(*encoded: Encoded) -> dict[str, int]:
    total = Counter()
    for e in encoded:
        total.update(e.counts)
    return dict(sorted(total.items()))


def build(params: Params, variant: VariantParams, tokenizer: Tokenizer, dpo: bool) -> TrainingSet:
    examples, sources = _read_all(params, variant, dpo)
    train, val = _split(examples, variant.val_fraction)
    encoder = Encoder(tokenizer, template(variant.template).source, variant.max_length, variant.overlong)
    encode = encoder.preferences if dpo else encoder.conversations
    train_enc, val_enc = encode(train), encode(val)
    counts = _counts(train_enc, val_enc)
    field = where(variant, dpo)
    if not train_enc.sequences:
        raise UserError(f"{field}: no training example is left after the length policy "
                        f"(max_length {variant.max_length}, overlong {variant.overlong}: {counts})")
    if not val_enc.sequences:  # no val split asked for, or none survived: validate on the training set
        val_enc = train_enc
    if dpo:
        arrays = {}
        for split, enc in (("train_", train_enc), ("val_", val_enc)):
            arrays |= pad([c for c, _ in enc.sequences], variant.max_length).arrays(f"{split}chosen_")
            arrays |= pad([r for _, r in enc.sequences], variant.max_length).arrays(f"{split}rejected_")
        items = len(train_enc.sequences)
        shape = {"pairs": items, "val_pairs": len(val_enc.sequences)}
    else:
        layout = pack if variant.packing else pad
        train_rows, val_rows = (layout(train_enc.sequences, variant.max_length),
                                layout(val_enc.sequences, variant.max_length))
        arrays = train_rows.arrays("train_") | val_rows.arrays("val_")
        items = len(train_rows)
        shape = {"conversations": len(train_enc.sequences), "val_conversations": len(val_enc.sequences),
                 "rows": items, "val_rows": len(val_rows), "learned_tokens": train_rows.learned_tokens,
                 "fill": round(float(train_rows.lengths.sum()) / (items * variant.max_length), 4)}
    return TrainingSet(arrays, items, {"sources": sources, "encoding": counts, **shape})
