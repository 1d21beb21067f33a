"""``tiered-store analyze``: a text corpus -> Engram access traces -> profiles, curves, tier sizes.

The pipeline, stage by stage (each timed), and the module that owns each stage:

1. **read** the corpus (:mod:`tiered_store.corpus`): one document per file, binary and non-UTF-8
   files skipped with a warning;
2. **tokenise** groups of documents with the DeepSeek tokenizer (``encode_batch``: Rust threads),
   in a background thread so it overlaps the next two stages (:mod:`.traces`);
3. **hash**: each document is cut into sequences of ``seq_len`` tokens, each starting with fresh
   (pad) N-gram context as the reference model does; ``batch_seqs`` sequences make a batch;
   :class:`~tiered_store.engram.NgramHasher` turns each into row ids of every Engram layer's
   concatenated table (hashes + head offsets). Distinct N-gram keys are counted on the way for
   the hash-collision rate (:mod:`.ngram_keys`: exactly up to order 3 of DeepSeek's ids, which
   pack into 63 bits; longer ones as 64-bit mixes, the report's ``key_method``);
4. **write trace**: in the order the model requests rows: per batch, per Engram layer (table
   ``layer{L}``), the layer's ``[S, T, H]`` ids (S sequences of T real positions, H heads;
   sequences of unequal length get one record each, so no padding position is written);
5. **profile** (:mod:`.profile_pass`, one streaming pass over the trace): lookups per row per
   table, deduplication within each sequence and each batch, then the frequency profile, Zipf
   fits, top shares and collision rates; with a holdout, :mod:`.holdout` compares the main
   profile's static top-K against the holdout's own;
6. **curves** (:mod:`.curves`, per table, tables in parallel): exact LRU, SHARDS (with its mean
   absolute error against exact LRU), static top-K, and Belady's MIN on a spatially sampled
   miniature trace;
7. **report**: recommended tier sizes as a store config (:mod:`.store_yaml`), plots, per-table
   reports and the top-level ``report.md``/``report.json`` (:mod:`zipf_analysis.report`).

Everything is written into a staging folder inside the output folder and moved into place at the
end, ``report.json`` last (:mod:`.publish`): a folder with a ``report.json`` holds one complete,
consistent run. A run holds a ``flock`` on its staging folder: the next run removes a killed
run's, refuses to write where a live run is writing, and leaves an older release's (which holds
no lock) with a warning. :mod:`.options` holds every default, :mod:`.pipeline` runs the stages
and :mod:`.cli` is the subcommand.
"""

import lazy_loader

# Exports load on first use (the stub beside this file lists them), so that the command
# line's --help and light tools need not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
