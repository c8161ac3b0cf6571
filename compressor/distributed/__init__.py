"""Data-parallel calibration on torch.distributed (docs/guides/distributed.md).

`torchrun --nproc-per-node N -m compressor compress ...` or `compressor compress --nproc N ...`
runs N copies of the same command (ranks). Each holds the whole model and the same calibration
windows (tokenised identically from the same seed) but *captures and runs* only its own contiguous
share of them, so activation memory per rank is its share. Per layer:

* statistics: each rank's partial sums (Gram sums X^T X, DriftCollector's cross sums, token
  counts; the loss-sensitivity pass' squared gradients) are all-gathered and added in rank order,
  in float64, on every rank (`reduce_in_order`). Every rank does the same additions in the same
  order, so every rank holds bit-identical statistics; against one process only the order of the
  float64 additions differs (the last bits).
* compression: every rank compresses the layer itself, from those identical statistics, except
  the work a stage maps through its executor (`Executor.map_by_cost`: the rank stage's
  decompositions, GPTQ's linears), which is packed over the ranks by cost and broadcast. The later
  stages of a layer depend on one another (structure changes the Grams the later stages see,
  adapters fit against the quantised base, eora's rank allocation pools every linear's energies
  at the end). Determinism is then checked, not assumed (policy.synced).
* data-free recipes (no calibration: svd, welore, rtn8) have no activations to split; their
  layers are split instead (policy.layer_split), and the results handed round (gather_specs).

Rank 0 alone checks and writes the output folder; the other ranks run with no output. Evaluation
(`--eval`) splits perplexity windows and HumanEval problems (eval/perplexity.py, eval/humaneval.py).
In one process every helper returns at once and the results are those of the plain path, bit for bit.

The package, by concern:
    state.py      who this rank is; joining the process group (init) and leaving it
    comm.py       collectives: barriers, objects, sums in rank order, module broadcasts
    sharding.py   which windows / evaluation items each rank takes
    policy.py     how the layer walk is shared out: window split (synced), layer split
    executor.py   what stages get (Run.executor): map work by cost, shard, sum, merge
    launch.py     `--nproc`: start the ranks on this machine and supervise them
Methods never import it: the driver hands them an executor. Nothing here imports torch at import
time: the CLI imports the package for `--nproc` before any model work.
"""

from __future__ import annotations

from compressor.distributed.comm import (
    all_gather_objects,
    barrier,
    broadcast_module,
    broadcast_object,
    reduce_collector,
    reduce_counts,
    reduce_in_order,
)
from compressor.distributed.executor import Executor, RankExecutor, executor
from compressor.distributed.policy import describe, fingerprint, gather_specs, in_layer_split, layer_split, layer_turn, synced
from compressor.distributed.sharding import gather_list, item_span, share, span
from compressor.distributed.state import (
    LOST,
    TIMEOUT_ENV,
    RankFailure,
    active,
    env_world_size,
    init,
    is_primary,
    launched,
    local_rank,
    rank,
    world_size,
)
from compressor.errors import CompressorError

__all__ = [
    "LOST", "TIMEOUT_ENV", "CompressorError", "Executor", "RankExecutor", "RankFailure", "active", "all_gather_objects", "barrier",
    "broadcast_module", "broadcast_object", "describe", "env_world_size", "executor", "fingerprint", "gather_list", "gather_specs",
    "in_layer_split", "init", "is_primary", "item_span", "launched", "layer_split", "layer_turn", "local_rank", "rank",
    "reduce_collector", "reduce_counts", "reduce_in_order", "share", "span", "synced", "world_size",
]
