"""NTP batches from megatron-core's ``GPTDataset`` / ``BlendedMegatronDatasetBuilder`` (``data.ntp_dataset``).

Which NTP stream a run uses is ``data.ntp_dataset`` (:func:`choose_ntp_dataset`):

* ``ours``: :class:`nemo_rlp.data.sampling.NTPBatcher` over the loaded documents (one stream per
  data-parallel rank, seeded per rank). JSON-lines and text corpora, the bundled demo among them,
  always take it.
* ``megatron``: megatron-core's ``GPTDataset`` over the indexed dataset(s) (``data.corpus``, or
  ``data.blend`` through ``BlendedMegatronDatasetBuilder``), read by :class:`MegatronNTPStream`.
  Blend weights are then Megatron's: shares of fixed-length samples, i.e. of *tokens*, where our
  :class:`~nemo_rlp.data.sources.BlendedDocuments` (which the RLP context sampler keeps using) weighs
  *documents*. ``GPTDataset`` joins the documents as stored, so they must end with the
  end-of-document id (``recipes/preprocess_data.py --append-eod``, as Megatron's own preprocessing).
* ``auto`` (the default): ``megatron`` for ``data.format=indexed`` data whose documents end with the
  end-of-document id; ``ours`` otherwise (logged when indexed data lacks the ids).

The dataset is built once, for ``data.ntp_samples`` samples or by default one pass over the data (as
many samples as the sources hold tokens: a size, and so an order, that depends on the data alone, so
that a longer run or the compute-matched NTP baseline resumed from a run's checkpoint continue the
same stream; a run that needs more repeats it). Its indices are cached under ``path_to_cache`` by
rank 0 first and then read by the other ranks (megatron's builder does this). All ranks hold the
same dataset: step after step the global batch is the next ``trainer.ntp_batch_size`` samples and
each data-parallel rank takes its contiguous share (as Megatron's pretraining sampler does), the
tensor-parallel ranks of a replica the same one. The state is the number of samples consumed, with
the dataset's identity (megatron's unique description hash and its parts) checked on restore.

Only megatron-core's public dataset API is used: the ``GPTDatasetConfig`` fields named in
:func:`build_gpt_dataset`, ``BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank,
config).build()``, ``dataset[i]["tokens"]`` / ``["labels"]``, ``len(dataset)``,
``unique_description_hash`` and ``IndexedDataset.sequence_lengths``; all unchanged from 0.16 to 0.19
(not the private ``_query_document_sample_shuffle_indices``, whose return value 0.19 changed).
megatron-core is imported only when a dataset is built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "NTP_DATASETS",
    "MegatronNTPStream",
    "MegatronTokenizerInfo",
    "build_gpt_dataset",
    "choose_ntp_dataset",
    "documents_without_eod",
]

logger = logging.getLogger(__name__)

NTP_DATASETS = ("auto", "ours", "megatron")


def documents_without_eod(documents: Any) -> int | None:
    """How many stored documents of indexed data do not end with the end-of-document id (summed over
    a blend's sources); None when ``documents`` is not indexed data."""
    from nemo_rlp.data.indexed import IndexedDocuments

    sources = getattr(documents, "sources", [documents])
    if not all(isinstance(s, IndexedDocuments) and s.num_without_eod is not None for s in sources):
        return None
    return sum(s.num_without_eod for s in sources)


def choose_ntp_dataset(data_cfg: Any, documents: Any) -> str:
    """``"ours"`` or ``"megatron"``: the NTP stream ``data.ntp_dataset`` asks for, given the loaded
    documents (module docstring). ValueError when ``megatron`` cannot read this data."""
    choice = getattr(data_cfg, "ntp_dataset", "auto")
    if choice not in NTP_DATASETS:
        raise ValueError(f"data.ntp_dataset={choice!r} is not one of {NTP_DATASETS}")
    if choice == "ours" or (choice == "auto" and data_cfg.format != "indexed"):
        return "ours"
    if data_cfg.format != "indexed":
        raise ValueError(f"data.ntp_dataset=megatron reads Megatron indexed datasets, not data.format="
                         f"{data_cfg.format!r}; use data.ntp_dataset=ours (or auto)")
    missing = documents_without_eod(documents)
    if missing:
        why = (f"{missing} of the indexed documents do not end with the end-of-document id, and megatron's "
               "GPTDataset joins documents as stored (no separator between them)")
        if choice == "megatron":
            raise ValueError(f"data.ntp_dataset=megatron: {why}. Rebuild the data with recipes/preprocess_data.py "
                             "--append-eod, or use data.ntp_dataset=ours (it adds the separators)")
        logger.warning("data.ntp_dataset=auto: NTP batches from nemo_rlp's NTPBatcher, not megatron's GPTDataset: "
                       "%s. Rebuild with recipes/preprocess_data.py --append-eod to use GPTDataset.", why)
        return "ours"
    return "megatron"


class MegatronTokenizerInfo:
    """What megatron's GPT datasets read from a tokenizer: ``vocab_size``, ``eod`` and
    ``unique_identifiers`` (part of the datasets' cache key). No ``pad``: the samples are never padded
    (megatron then uses -1, an id no data holds)."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size, self.eod = int(vocab_size), int(eod)
        self.unique_identifiers = {"class": "nemo_rlp", "vocab_size": self.vocab_size, "eod": self.eod}


def build_gpt_dataset(
    paths: Sequence[str],
    weights: Sequence[float] | None,
    *,
    seq_len: int,
    num_samples: int | None,
    seed: int,
    tokenizer: MegatronTokenizerInfo,
    cache_dir: str | os.PathLike[str],
):
    """The training split of megatron-core's GPT dataset over ``paths`` (indexed-dataset prefixes),
    blended by ``weights`` (token shares; None for one path), with at least ``num_samples`` samples
    of ``seq_len + 1`` tokens (None: one pass over the data, as many samples as all paths hold tokens,
    which depends on the data alone); indices cached in ``cache_dir``. Collective when
    torch.distributed is initialized (rank 0 builds, then the others read the cache); megatron-core
    0.16 needs it initialized to build a blend."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if len(paths) > 1 and (weights is None or len(weights) != len(paths)):
        raise ValueError(f"a blend of {len(paths)} datasets needs one weight each, got {weights}")
    config = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_len),
        blend=(list(paths), None if weights is None else [float(w) for w in weights]),
        split="1,0,0",  # all of it for training; RLP's held-out set is separate (eval.corpus)
        path_to_cache=os.fspath(cache_dir),
        mmap_bin_files=True,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    if num_samples is None:
        tokens = 0
        for path in paths:  # held while read: megatron closes its memory map when the dataset is deleted
            indexed = IndexedDataset(path, multimodal=False, mmap=True)
            tokens += int(indexed.sequence_lengths.sum())
            del indexed
        num_samples = max(1, (tokens - 1) // int(seq_len))
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [int(num_samples), 0, 0], lambda: True, config)
    return builder.build()[0]


class MegatronNTPStream:
    """NTP batches ``[batch_size, seq_len + 1]`` from a megatron GPT dataset (or blend), in its order.

    Sample ``i`` is the dataset's ``tokens`` followed by the last of its ``labels``: ``seq_len + 1``
    consecutive stream tokens, the next sample starting ``seq_len`` tokens later, the contract of
    :meth:`nemo_rlp.data.sampling.NTPBatcher.next_batch`. Each :meth:`next_batch` consumes one global
    batch of ``global_batch_size`` samples, of which this rank returns ``batch_size`` from
    ``rank_offset`` on. Past the end of the dataset the samples repeat from its start (logged).
    """

    def __init__(self, dataset, *, global_batch_size: int, rank_offset: int = 0,
                 identity: dict[str, Any] | None = None) -> None:
        if not 0 <= rank_offset < global_batch_size:
            raise ValueError(f"rank_offset={rank_offset} must lie in [0, global_batch_size={global_batch_size})")
        if len(dataset) == 0:
            raise ValueError("the megatron GPT dataset has no samples: is the data shorter than data.ntp_seq_len?")
        self.dataset = dataset
        self.global_batch_size, self.rank_offset = int(global_batch_size), int(rank_offset)
        self.consumed_samples = 0  # global, over all data-parallel ranks
        self.identity = {**(identity or {}), "description_hash": dataset.unique_description_hash,
                         "length": len(dataset)}
        self._wrapped = False

    def next_batch(self, batch_size: int) -> torch.LongTensor:
        if not 1 <= batch_size <= self.global_batch_size - self.rank_offset:
            raise ValueError(f"batch_size={batch_size} must lie in [1, {self.global_batch_size - self.rank_offset}] "
                             f"(global batch {self.global_batch_size}, this rank's offset {self.rank_offset})")
        import torch

        first = self.consumed_samples + self.rank_offset
        if first + batch_size > len(self.dataset) and not self._wrapped:
            self._wrapped = True
            logger.warning("the NTP dataset's %d samples are used up: repeating them from the start (set "
                           "data.ntp_samples to the run's NTP samples or more for a reshuffled further "
                           "pass)", len(self.dataset))
        rows = []
        for i in range(first, first + batch_size):
            sample = self.dataset[i % len(self.dataset)]
            rows.append(torch.cat([sample["tokens"], sample["labels"][-1:]]))
        self.consumed_samples += self.global_batch_size
        return torch.stack(rows).long()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "megatron", "consumed_samples": self.consumed_samples,
                "global_batch_size": self.global_batch_size, "dataset": dict(self.identity)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state``'s samples; ValueError naming what differs if it was saved over
        another NTP stream or another dataset."""
        if state.get("kind") != "megatron":
            raise ValueError(
                "the checkpoint's NTP stream is nemo_rlp's NTPBatcher (data.ntp_dataset=ours), this run reads "
                "megatron's GPTDataset; resume with data.ntp_dataset=ours"
            )
        saved, now = state["dataset"], self.identity
        if saved != now:
            differs = ", ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
                                for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
            raise ValueError(
                f"the NTP dataset differs from the checkpoint's ({differs}). Resume with the same data, "
                "data.ntp_seq_len, trainer.seed and data.ntp_samples (megatron shuffles the dataset for its "
                "whole length: requested_samples null is one pass over the data)"
            )
        self.consumed_samples = int(state["consumed_samples"])
        if int(state["global_batch_size"]) != self.global_batch_size:
            logger.warning("trainer.ntp_batch_size changed from %d to %d: the NTP stream goes on after the "
                           "%d samples consumed", state["global_batch_size"], self.global_batch_size,
                           self.consumed_samples)
