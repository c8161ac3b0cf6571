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
* compression: every rank compresses the layer itself, from those identical statistics. The
  alternative, spreading the layer's linears over the ranks by cost and broadcasting the results,
  is taken for the rank stage's decompositions only (`spread`); the later stages of a layer depend
  on one another (structure changes the Grams the later stages see, adapters fit against the
  quantised base, eora's rank allocation pools every linear's energies at the end). The part
  that grows with the calibration set, the forward passes and the Gram products, is what is split.
  Determinism is then checked, not assumed: after each visit the ranks compare a
  fingerprint of the layer's tensors and, should they differ (non-deterministic GPU kernels,
  mixed hardware), rank 0's layer is broadcast to the others (`synced`), so the next layer's
  inputs always come from the layer rank 0 will write.
* data-free recipes (no calibration: svd, welore, rtn8) have no activations to split; their
  layers are split instead, rank r compressing layers r, r + N, ... (`layer_split`, `layer_turn`),
  and the compressed modules and their specs are all-gathered (`gather_specs`).

Rank 0 alone checks and writes the output folder; the other ranks run with no output. Evaluation
(`--eval`) splits perplexity windows and HumanEval problems (eval/perplexity.py, eval/humaneval.py).

In one process (no WORLD_SIZE > 1 in the environment, no initialised process group) every helper
here returns at once and the results are those of the plain path, bit for bit.

This module imports torch lazily: the CLI imports it for `--nproc` before any model work.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from compressor.errors import CompressorError

log = logging.getLogger("compressor.distributed")

# Environment variables torchrun sets (and `--nproc` sets the same way).
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "COMPRESSOR_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks
FAULT_ENV = "COMPRESSOR_DIST_FAULT"  # testing aid: "RANK:LAYER:raise|exit" makes that rank fail there
LOST = "lost contact with the other ranks"
_GATHERED = 1 << 22  # float64 elements one all_gather of reduce_in_order brings in, over all ranks (32 MiB)


class RankFailure(CompressorError):
    """A collective failed: another rank died or was stopped. Exit code 1 (not the user's input)."""

    exit_code = 1


class _State:
    control = None  # a gloo group for objects and barriers (None: the default group is gloo)
    backend: str | None = None
    split = False  # inside layer_split(True): data-free walks split their layers over the ranks
    split_used = False  # some compression of this process split its layers (for the report)
    repairs = 0  # layers whose copies differed between ranks and were broadcast from rank 0


_state = _State()


# ----------------------------------------------------------------------------- who am I


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        raise CompressorError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun or --nproc") from None


def launched() -> bool:
    """Whether this process is one of several ranks (torchrun or --nproc set WORLD_SIZE > 1)."""
    return env_world_size() > 1


def _dist():
    """torch.distributed, if torch is already imported (so the CLI never imports torch for this)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() else None


def active() -> bool:
    """Whether a process group of more than one rank is up (False: the plain one-process path)."""
    dist = _dist()
    return dist is not None and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    if active():
        return _dist().get_rank()
    return int(os.environ.get("RANK") or 0)


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_primary() -> bool:
    """Rank 0: the one that writes. True in one process."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK") or 0)


def init() -> bool:
    """Join the process group that torchrun's (or --nproc's) environment describes; a no-op when
    WORLD_SIZE is 1 or unset, or when the caller already initialised one. Returns active()."""
    if active():
        if _state.backend is None:  # a process group the caller started: objects and barriers need gloo
            import torch.distributed as dist

            _state.backend = str(dist.get_backend())
            _state.control = None if _state.backend == "gloo" else dist.new_group(backend="gloo")
        return True
    if not launched():
        return False
    import datetime

    import torch
    import torch.distributed as dist

    missing = [k for k in _ENV if not os.environ.get(k)]
    if missing:
        raise CompressorError(f"WORLD_SIZE is {env_world_size()} but {', '.join(missing)} not set; launch with torchrun or --nproc")
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or 1800))
    # Gloo for CPU tensors and objects, NCCL for CUDA tensors (Grams collected on a GPU).
    cuda = torch.cuda.is_available()
    backend = os.environ.get("COMPRESSOR_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if cuda and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
    try:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        _state.backend = backend
        _state.control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        raise RankFailure(f"rank {os.environ.get('RANK')}: could not join the other ranks at "
                          f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {_first_line(exc)}") from None
    if rank() > 0:
        # One progress stream is enough: rank 0's.
        logging.getLogger("compressor.progress").setLevel(logging.WARNING)
    barrier("start-up")
    log.info("rank %d of %d up (%s)", rank(), world_size(), backend)
    return True


def describe() -> dict:
    """The report's "distributed" entry; {} in one process, so a one-process report is unchanged."""
    if not active():
        return {}
    return {"distributed": {"world_size": world_size(), "backend": _state.backend,
                            "split": "layers" if _state.split_used else "calibration windows",
                            "layers_repaired_from_rank_0": _state.repairs}}


# ----------------------------------------------------------------------------- collectives


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _collective(what: str, fn: Callable):
    """Run one collective; a peer that died turns gloo's / NCCL's error into one line."""
    try:
        return fn()
    except RuntimeError as exc:  # DistBackendError and gloo's "Connection reset by peer" are RuntimeErrors
        failure = RankFailure(f"rank {rank()}: {LOST} during {what} (another rank failed or was stopped): {_first_line(exc)}")
        # A broken gloo group left to the interpreter's exit sometimes aborts the process (SIGABRT,
        # "terminate called without an active exception"); taken down here it does not.
        with contextlib.suppress(Exception):
            _dist().destroy_process_group()
        raise failure from None


def barrier(what: str = "barrier", timeout: float | None = None) -> None:
    """Wait until every rank gets here, at most `timeout` seconds (default: COMPRESSOR_DIST_TIMEOUT);
    a rank that does not arrive in time is named in the error."""
    if not active():
        return
    import datetime

    import torch.distributed as dist

    seconds = float(timeout if timeout is not None else os.environ.get(TIMEOUT_ENV) or 1800)
    _collective(what, lambda: dist.monitored_barrier(group=_state.control, timeout=datetime.timedelta(seconds=seconds), wait_all_ranks=True))


def all_gather_objects(obj, what: str = "exchange") -> list:
    """Every rank's `obj`, in rank order (pickled, over gloo)."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    _collective(what, lambda: dist.all_gather_object(out, obj, group=_state.control))
    return out


def broadcast_object(obj, src: int = 0, what: str = "broadcast"):
    """Rank `src`'s `obj` on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj]
    _collective(what, lambda: dist.broadcast_object_list(box, src=src, group=_state.control))
    return box[0]


def _sum_in_rank_order(t, what: str):
    """sum over ranks of `t`, added as ((t_0 + t_1) + t_2) + ... in float64 on every rank; in
    chunks of 32 MiB / world_size per rank, so the memory it takes does not grow with the ranks."""
    import torch
    import torch.distributed as dist

    flat = t.detach().reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.float64, device=t.device)
    n = world_size()
    chunk = max(1 << 12, _GATHERED // n)
    for start in range(0, flat.numel(), chunk):
        piece = flat[start : start + chunk].to(torch.float64).contiguous()
        parts = [torch.empty_like(piece) for _ in range(n)]
        _collective(what, lambda: dist.all_gather(parts, piece))
        acc = parts[0].clone()
        for p in parts[1:]:
            acc += p
        out[start : start + piece.numel()] = acc
    return out.view(t.shape).to(t.dtype)


def reduce_in_order(tensors: dict, what: str = "statistics") -> dict:
    """{key: sum over ranks} for a dict of partial sums that every rank holds with the same keys and
    shapes; each added in rank order in float64 (then cast back to its dtype)."""
    if not active():
        return tensors
    keys = sorted(tensors)
    layout = [(k, tuple(tensors[k].shape), str(tensors[k].dtype)) for k in keys]
    layouts = all_gather_objects(layout, what)
    if any(other != layout for other in layouts):
        raise RankFailure(f"rank {rank()}: the ranks collected different {what} ({layouts[0][:3]} ... vs {layout[:3]} ...); "
                          "every rank must run the same model and recipe")
    return {k: _sum_in_rank_order(tensors[k], what) for k in keys}


def reduce_counts(counts: dict, what: str = "token counts") -> dict:
    """{key: sum over ranks} of integer counts (exact)."""
    if not active():
        return counts
    every = all_gather_objects(sorted(counts.items()), what)
    if any([k for k, _ in c] != sorted(counts) for c in every):
        raise RankFailure(f"rank {rank()}: the ranks counted different {what}; every rank must run the same model and recipe")
    return {k: sum(dict(c)[k] for c in every) for k in counts}


def reduce_collector(collector) -> None:
    """A GramCollector's / DriftCollector's partial sums and counts, replaced by their sums over
    the ranks (then grams() and crosses() are the whole calibration set's)."""
    if not active():
        return
    collector.sums = reduce_in_order(collector.sums, "Gram sums")
    collector.counts = reduce_counts(collector.counts)
    if getattr(collector, "cross_sums", None):
        collector.cross_sums = reduce_in_order(collector.cross_sums, "cross-Gram sums")


# ----------------------------------------------------------------------------- shares of the data


def span(n: int, parts: int, index: int, align: int = 1, allow_empty: bool = False) -> tuple[int, int]:
    """The contiguous [lo, hi) of items 0..n-1 that part `index` of `parts` takes.

    align: items come in blocks of `align` (calibration batches): when there are at least `parts`
    blocks, whole blocks are split, so every rank runs exactly the batches one process would run.
    Otherwise items are split one by one."""
    blocks = -(-n // align) if align > 1 else n
    if align > 1 and blocks >= parts:
        lo, hi = blocks * index // parts * align, blocks * (index + 1) // parts * align
        return min(lo, n), min(hi, n)
    if n < parts and not allow_empty:
        raise CompressorError(f"{n} calibration windows cannot be split over {parts} ranks; use --samples {parts} or more, or fewer processes")
    return n * index // parts, n * (index + 1) // parts


def share(windows, batch_size: int = 1):
    """This rank's contiguous share of the calibration windows (all of them in one process)."""
    if windows is None or not active():
        return windows
    lo, hi = span(windows.shape[0], world_size(), rank(), batch_size)
    return windows[lo:hi]


def item_span(n: int, batch_size: int = 1) -> tuple[int, int]:
    """[lo, hi) of n evaluation items (windows, problems) for this rank; may be empty."""
    if not active():
        return 0, n
    return span(n, world_size(), rank(), batch_size, allow_empty=True)


def gather_list(items: list, what: str = "results") -> list:
    """Every rank's list, concatenated in rank order (so in item order for item_span shares)."""
    if not active():
        return items
    return [x for part in all_gather_objects(items, what) for x in part]


# ----------------------------------------------------------------------------- the walk


def fingerprint(module) -> str:
    """A digest of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        data = t.detach().reshape(-1)
        if data.numel():
            h.update(data.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def broadcast_module(module, src: int = 0, what: str = "layer broadcast") -> None:
    """Overwrite every rank's parameters and buffers of `module` with rank `src`'s, in place (the
    modules must have the same structure: the same recipe ran on the same model)."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    tensors = [*module.named_parameters(), *module.named_buffers()]
    layout = [(n, tuple(t.shape), str(t.dtype)) for n, t in tensors]
    if any(other != layout for other in all_gather_objects(layout, what)):
        raise RankFailure(f"rank {rank()}: the ranks compressed a layer into different shapes; "
                          "they must run the same model and recipe on the same kind of device")
    with torch.no_grad():
        for _, t in tensors:
            data = t.detach()
            buf = data if data.is_contiguous() else data.contiguous()
            _collective(what, lambda: dist.broadcast(buf, src=src))
            if buf is not data:
                data.copy_(buf)
    for m in module.modules():
        if hasattr(m, "_cache"):  # QuantLinear keeps its dequantised weight: it is stale now
            m._cache = None


def synced(visit: Callable) -> Callable:
    """visit(i, layer, ...) followed by the ranks' check that they hold the same layer; where they
    do not, rank 0's is broadcast (see the module docstring)."""

    def visit_and_sync(i, layer, *args, **kwargs):
        visit(i, layer, *args, **kwargs)
        prints = all_gather_objects(fingerprint(layer), f"layer {i} check")
        if len(set(prints)) > 1:
            _state.repairs += 1
            log.warning("layer %d: the ranks' compressed copies differ (%d distinct); rank 0's is broadcast", i, len(set(prints)))
            broadcast_module(layer, 0, f"layer {i} broadcast")

    return visit_and_sync


def spreading() -> bool:
    """Whether every rank is visiting the current layer (a calibrated walk), so its decompositions
    can be spread over them (`spread`)."""
    return active() and not _state.split


def spread(mats: list, compute: Callable[[list[int]], list], what: str = "decompositions") -> list:
    """compute(indices) for all of `mats` (one result per matrix, in order), each matrix done on one
    rank and the results broadcast by their owners, so every rank gets the same bits.

    Matrices of one shape stay together on one rank: the decompositions batch them by shape (and
    give a shape's matrices the largest rank asked of any; the randomized SVD's test matrix depends
    on the position in the batch), so this keeps every result what one process computes. The shape
    groups go to ranks by cost, largest first to the least loaded (an LPT bin-packing), with cost
    m n min(m, n) + n^3 per matrix: the SVD of W (m x n) and the eigh of its n x n Gram."""
    if not active():
        return compute(list(range(len(mats))))
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault(tuple(m.shape), []).append(i)
    cost = {shape: sum(shape[0] * shape[1] * min(shape) + shape[1] ** 3 for _ in idx) for shape, idx in groups.items()}
    load, owner = [0.0] * world_size(), {}
    for shape in sorted(groups, key=lambda sh: (-cost[sh], groups[sh][0])):
        r = min(range(world_size()), key=lambda k: (load[k], k))
        owner[shape], load[r] = r, load[r] + cost[shape]
    mine = sorted(i for shape, idx in groups.items() if owner[shape] == rank() for i in idx)
    done = {i: _to_cpu(res) for i, res in zip(mine, compute(mine))} if mine else {}
    results: dict = {}
    for r in sorted(set(owner.values())):
        results.update(broadcast_object(done if r == rank() else None, r, f"{what} of rank {r}"))
    return [results[i] for i in range(len(mats))]


def _to_cpu(value):
    """Tensors inside dicts / lists / tuples moved to the host (for pickling between ranks)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


@contextlib.contextmanager
def layer_split(enabled: bool):
    """Within the block, walks without calibration data visit only this rank's layers (r, r + N,
    ...); gather_specs then shares the results. No effect in one process."""
    previous = _state.split
    _state.split = bool(enabled) and active()
    _state.repairs = 0
    _state.split_used = _state.split  # for this compression's report
    try:
        yield
    finally:
        _state.split = previous


def splitting() -> bool:
    return _state.split and active()


def layer_turn(index: int, split: bool) -> bool:
    """Whether this rank visits decoder layer `index` (always, unless the walk is split)."""
    _fault(index)
    return not split or index % world_size() == rank()


def _fault(index: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    who, layer, how = (spec.split(":") + ["raise"])[:3]
    if int(who) == rank() and int(layer) == index:
        if how == "exit":
            os._exit(7)
        raise RuntimeError(f"fault injected by {FAULT_ENV}={spec} on rank {rank()} in layer {index}")


def merge_split(found: dict, what: str = "spectra") -> dict:
    """A dict that a split walk filled for this rank's layers only, merged over the ranks (in rank
    order; the keys, full module names, are disjoint). Unchanged outside a split walk."""
    if not splitting():
        return found
    merged: dict = {}
    for part in all_gather_objects(found, what):
        merged.update(part)
    return merged


def gather_specs(model, found: dict, sync: bool = False) -> None:
    """After a recipe ran on every rank: in a layer split, each layer's owner broadcasts its
    compressed modules and their specs, one layer at a time (so the extra memory is one layer's),
    and every rank installs them, the specs merged in layer order as one process records them.
    Otherwise, with `sync`, every rank's model is made rank 0's (for the evaluation that follows).
    `found`: full linear name -> spec, this rank's, replaced by every rank's. No-op in one process."""
    if not active():
        return
    from compressor import models  # here, not on top: the CLI imports this module before torch

    if not splitting():
        if sync:
            prints = all_gather_objects(fingerprint(model), "model check")
            if len(set(prints)) > 1:
                broadcast_module(model, 0, "model broadcast")
        return
    mine, specs = dict(found), {}
    for i in range(len(models.decoder_layers(model))):
        prefix, owner = models.layer_prefix(model, i) + ".", i % world_size()
        payload = {full: (spec, model.get_submodule(full)) for full, spec in mine.items() if full.startswith(prefix)} if owner == rank() else None
        payload = broadcast_object(payload, owner, f"layer {i}'s compressed modules")
        for full, (spec, module) in payload.items():
            specs[full] = spec
            if owner != rank():
                model.set_submodule(full, module)
    # A split walk is data-free, so no stage holds adapters or other per-rank state to merge.
    for others in all_gather_objects({f: s for f, s in mine.items() if f not in specs}, "specs"):  # outside the layers (none so far), in rank order
        specs.update(others)
    found.clear()
    found.update(specs)


# ----------------------------------------------------------------------------- --nproc


def command_words(ctx, drop: tuple[str, ...] = ("nproc",)) -> list[str]:
    """The click command behind `ctx` as command-line words (global -v, the command, its options,
    then `--` and its arguments), so each rank re-runs exactly what was asked."""
    import click

    words = ["-v"] if ctx.parent is not None and ctx.parent.params.get("verbose") else []
    words.append(ctx.info_name)
    arguments: list[str] = []
    for param in ctx.command.params:
        if param.name in drop or param.name not in ctx.params:
            continue
        value = ctx.params[param.name]
        if value is None:
            continue
        if isinstance(param, click.Argument):
            arguments.extend(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            continue
        name = max(param.opts, key=len)
        if getattr(param, "count", False):
            words.extend([name] * int(value))
        elif param.is_flag:
            if value:
                words.append(name)
            elif param.secondary_opts:
                words.append(max(param.secondary_opts, key=len))
        else:
            for v in value if param.multiple else [value]:
                words.append(name)
                words.extend(str(x) for x in (v if isinstance(v, tuple) else (v,)))
    return [*words, "--", *arguments] if arguments else words


def start(ctx, nproc: int) -> bool:
    """`--nproc N` of a click command: run N ranks of it and return True once all succeeded (a
    failure raises one line). False when there is nothing to start: N == 1, or this process is
    already a rank of a torchrun/--nproc launch of N."""
    if nproc <= 1 and not launched():
        return False
    if launched():
        if env_world_size() != nproc:
            raise CompressorError(f"--nproc {nproc} under a launch of WORLD_SIZE={env_world_size()} processes; leave --nproc out under torchrun")
        return False
    if ctx.params.get("stream") or ctx.params.get("resume"):
        raise CompressorError("--stream/--resume are not distributed yet; leave out --nproc")
    launch(command_words(ctx), nproc)
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


GRACE = 10.0  # seconds the other ranks get to stop on their own after one failed
KILL_AFTER = 30.0  # seconds after SIGTERM (rank 0 removes its temporary folder) before SIGKILL


class _Rank:
    def __init__(self, index: int, proc: subprocess.Popen, forward: bool):
        self.index, self.proc, self.forward = index, proc, forward
        self.error: str | None = None  # its last "error: ..." line
        self.exited_at: float | None = None
        self.stopped = False  # terminated by the launcher
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            if line.startswith("error: "):
                self.error = line[len("error: "):].strip()
            elif self.forward:
                sys.stderr.write(line)
                sys.stderr.flush()


def launch(words: list[str], nproc: int) -> None:
    """Run `python -m compressor WORDS` as ranks 0..nproc-1 on this machine (localhost rendezvous
    on a free port) and supervise them: rank 0's stdout and stderr pass through; when a rank fails,
    the others get GRACE seconds to stop, then SIGTERM, then SIGKILL, and the first failure is
    raised as one line (RankFailure, with that rank's exit code)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1"}
    # Like torchrun, but sharing the cores out instead of one thread each.
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // nproc)))
    ranks: list[_Rank] = []
    try:
        for r in range(nproc):
            proc = subprocess.Popen([sys.executable, "-m", "compressor", *words], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                    stdin=subprocess.DEVNULL, stdout=None if r == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, errors="replace", bufsize=1)
            ranks.append(_Rank(r, proc, forward=r == 0))
        _supervise(ranks)
    finally:
        _stop(ranks)
    _verdict(ranks)


def _supervise(ranks: list[_Rank]) -> None:
    failed_at = stopped_at = None
    while True:
        now = time.monotonic()
        for r in ranks:
            if r.exited_at is None and r.proc.poll() is not None:
                r.exited_at = now
        if all(r.exited_at is not None for r in ranks):
            return
        if failed_at is None and any(r.proc.returncode not in (None, 0) for r in ranks):
            failed_at = now
        if failed_at is not None and stopped_at is None and now - failed_at > GRACE:
            stopped_at = now
            for r in ranks:
                if r.proc.poll() is None:
                    r.stopped = True
                    r.proc.send_signal(signal.SIGTERM)
        if stopped_at is not None and now - stopped_at > KILL_AFTER:
            for r in ranks:
                if r.proc.poll() is None:
                    r.proc.kill()
        time.sleep(0.05)


def _stop(ranks: list[_Rank]) -> None:
    """Whatever ended the launcher (Ctrl-C, SIGTERM, an error): no rank outlives it."""
    running = [r for r in ranks if r.proc.poll() is None]
    for r in running:
        r.stopped = True
        r.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + KILL_AFTER
    for r in running:
        try:
            r.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()
    for r in ranks:
        r.reader.join(timeout=5)


def _verdict(ranks: list[_Rank]) -> None:
    failed = [r for r in ranks if r.proc.returncode != 0]
    if not failed:
        return
    # The first failure that is not a consequence of another (a lost peer, the launcher's SIGTERM).
    order = sorted(failed, key=lambda r: (r.stopped, r.error is not None and LOST in r.error, r.exited_at or 0.0, r.index))
    culprit = order[0]
    code = culprit.proc.returncode
    if culprit.error is not None:
        what = culprit.error
    elif code < 0:
        what = f"killed by {signal.Signals(-code).name}"
    else:
        what = f"exited with code {code} and no message"
    same = culprit.error is not None and all(r.error == culprit.error for r in failed) and len(failed) == len(ranks)
    message = what if same else f"rank {culprit.index} of {len(ranks)}: {what}; all ranks stopped"
    failure = RankFailure(message)
    failure.exit_code = code if 0 < code < 256 else 1
    raise failure
