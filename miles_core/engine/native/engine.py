"""`NativeEngine`: the in-process `RolloutEngine`, a facade over pool, scheduler and runner.

It runs the same model class the trainer trains (DESIGN principle 3) with continuous batching
over a paged KV cache (vLLM / nano-vllm design; see `scheduler` for the policy). Requests come
in through `submit` (thread-safe: a server thread may call it while another thread drives
`step`, or while `start()`'s background loop does); `generate` submits a batch and steps until
it is answered. Each `step` drains the inbox (submissions, aborts), schedules one forward,
samples one token for every sequence that finished its prompt or decoded, and retires finished
sequences, freeing their blocks. While `generate` drives the steps (it reads answers only once
all are in), a request whose last sequence finished is answered (its `Generation`s built: output
copies, the response text decoded) in the next step right after that step's forward is
launched, so on a GPU the host does it while the forward runs, or when there is no next forward;
other callers (a background loop, a caller stepping itself) get each answer in the step that
finished it, as they may act on it before the next step.

Colocation (`engine.colocate`): `release_memory` / `resume_memory` (`colocation.py`).
With `engine.overlap` a decode step is read one step late (`overlap.py`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from miles_core.config import EngineConfig
from miles_core.engine.native.block_manager import BlockManager
from miles_core.engine.native.colocation import EngineReleased, MemoryControl
from miles_core.engine.native.cuda_graphs import DecodeGraphs, capturable
from miles_core.engine.native.fuse import fuse_projections, fuses_on
from miles_core.engine.native.kv_pool import KVPool, block_bytes, num_kv_blocks
from miles_core.engine.native.outputs import finish_reason, to_generation
from miles_core.engine.native.overlap import PendingTokens
from miles_core.engine.native.runner import ModelRunner
from miles_core.engine.native.sampling_tensors import SamplingTensors
from miles_core.engine.native.scheduler import Row, Scheduler
from miles_core.engine.native.sequence import RequestHandle, new_handle
from miles_core.engine.native.sequence import Sequence as Seq
from miles_core.engine.native.streams import uniforms
from miles_core.engine.native.weight_table import WeightTable
from miles_core.engine.protocol import GenerateRequest, Generation
from miles_core.engine.sampler import sample_tokens
from miles_core.errors import MilesError
from miles_core.kernels import model_ops
from miles_core.utils.device import on_device, to_device

ABORTED = {"type": "abort", "message": "aborted by request"}


class NativeEngine(MemoryControl):
    """`RolloutEngine` over a native model in this process."""

    def __init__(self, model: nn.Module, tokenizer, cfg: EngineConfig, *, eos_token_ids: Iterable[int],
                 max_position_embeddings: int, weight_version: str = "0") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context_len = cfg.max_context_len or max_position_embeddings
        # Routing capture (SGLang's --enable-return-routed-experts): MoE models only.
        self.capture_routing = cfg.return_routed_experts and getattr(model, "num_moe_layers", 0) > 0
        self._weight_version = weight_version
        if fuses_on(self.model):
            fuse_projections(self.model)  # q/k/v and gate/up GEMMs, one each
        self.pool = self._new_pool()
        self.blocks = BlockManager(self.pool.num_blocks, cfg.block_size, on_first_use=self.pool.zero_block)
        self.scheduler = Scheduler(self.blocks, self.pool.copy_block, max_batch_size=cfg.max_batch_size,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens,
                                   cache_routing=self.capture_routing)
        self.runner = ModelRunner(self.model, self.pool, capture_routing=self.capture_routing)
        self._capture_graphs()
        self.weights = WeightTable(self.model)
        self._init_memory_control()
        self._paused = threading.Event()
        self._inbox: list[tuple[str, object]] = []
        self._inbox_lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._handles: dict[int, RequestHandle] = {}
        self._wake = threading.Condition()
        self._loop: threading.Thread | None = None
        self._stop = False
        self._finished: list[tuple[RequestHandle, str]] = []
        """Requests whose sequences have all finished, with the weight version they finished
        under, to answer after the next forward is launched (`_answer_finished`)."""
        self._num_answering_late = 0
        """`generate` calls stepping now: while any is, answers wait for the next forward."""
        self._sampling_params = SamplingTensors()
        """((setting, rows, device), tensors) of the last step sampled with one setting for all rows."""
        self._overlap = cfg.overlap == "on" or (cfg.overlap == "auto" and self.device.type == "cuda")
        self._pending: PendingTokens | None = None
        """`engine.overlap`: the last decode step's tokens, not yet read (`overlap.py`)."""

    def _new_pool(self) -> KVPool:
        num_kv_heads, head_dim, v_head_dim = self.model.kv_cache_dims()
        num_layers, weight = self.model.args.num_hidden_layers, self.model.lm_head.weight
        per_block = block_bytes(num_layers, self.cfg.block_size, num_kv_heads, head_dim, v_head_dim, weight.dtype)
        count = num_kv_blocks(requested=self.cfg.num_kv_blocks, mem_fraction=self.cfg.mem_fraction,
                              per_block=per_block, device=weight.device, max_batch_size=self.cfg.max_batch_size,
                              max_context_len=self.max_context_len, block_size=self.cfg.block_size)
        return KVPool(num_layers, count, self.cfg.block_size, num_kv_heads, head_dim, v_head_dim, weight.dtype,
                      weight.device)

    def _capture_graphs(self) -> None:
        if capturable(self.model, self.device, enabled=self.cfg.cuda_graphs, block_size=self.cfg.block_size,
                      capture_routing=self.capture_routing):
            with on_device(self.device):  # captures go to the current device
                self.runner.graphs = DecodeGraphs(self.model, self.pool, max_batch_size=self.cfg.max_batch_size,
                                                  max_blocks_per_row=self.blocks.blocks_for(self.max_context_len))

    @property
    def weight_version(self) -> str:
        return self._weight_version

    @property
    def device(self) -> torch.device:
        return self.pool.keys[0].device

    # -- control ---------------------------------------------------------------------------
    bounded_waits = True
    """`update_weights` and `flush_cache` take `timeout_s`, the longest wait for a running step: an
    in-process weight sync runs on the trainer's thread under that bound (`InProcessSync`)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str, *,
                       timeout_s: float | None = None) -> None:
        """Replace weights and stamp `version`; also drops the prefix cache. Waits at most
        `timeout_s` seconds (None: as long as it takes) for the running step to end."""
        self._check_weights_mapped("update_weights")
        targets, sources, key = self.weights.checked_updates(named_tensors)  # all checked before any is written
        with self._stepping(timeout_s, "update_weights"), torch.no_grad():
            self._settle()  # tokens of the old weights finish their requests under the old version
            if targets:  # one launch instead of one per tensor (~300 at 0.6B)
                self.weights.write(targets, sources, key)
            self.blocks.flush()  # cached K/V were computed by the old weights
            self._weight_version = str(version)  # before any step runs on the new weights

    @contextmanager
    def _stepping(self, timeout_s: float | None, what: str) -> Iterator[None]:
        """Hold the step lock, waiting at most `timeout_s` seconds for it."""
        if not self._step_lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
            raise MilesError(f"{what}: the engine's running step did not end within {timeout_s:g} s "
                             "(sync.timeout_s); the engine is stuck")
        try:
            yield
        finally:
            self._step_lock.release()

    def get_weights_by_name(self, name: str) -> torch.Tensor:
        """The tensor the engine computes with under HF name `name` (SGLang's `/get_weights_by_name`)."""
        self._check_weights_mapped("get_weights_by_name")
        tensor = self.weights.get(name, "get_weights_by_name").detach()
        if name in self.weights.unwritten():
            self.check_weights_written(f"get_weights_by_name('{name}')")
        return tensor

    def _check_weights_mapped(self, what: str) -> None:
        """Released fixed-address weights have no pages under them: a read or write there would
        be an illegal address on the device, which ends the CUDA context. Dropped weights lie on
        no device until the resume: a write there would be lost."""
        if self._stable_released or (self._host is not None and self._host.dropped_bytes):
            raise EngineReleased(f"{what}: the engine's memory is released (engine.colocate); call resume_memory first")

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()
        self._notify()

    def flush_cache(self, *, timeout_s: float | None = None) -> None:
        """Drop the prefix cache (blocks in use stay with their sequences)."""
        with self._stepping(timeout_s, "flush_cache"):
            self.blocks.flush()

    def health(self) -> bool:
        return not self._paused.is_set()

    # -- submission ------------------------------------------------------------------------
    def submit(self, request: GenerateRequest, on_progress: Callable[[int], None] | None = None) -> RequestHandle:
        """Queue a request (thread-safe); the handle's `result()` gives its n generations."""
        return self.submit_all([request], on_progress)[0]

    def submit_all(self, requests: Sequence[GenerateRequest],
                   on_progress: Callable[[int], None] | None = None) -> list[RequestHandle]:
        """Queue requests together, all checked first: they join the same step, so a batch sent at
        once is scheduled as one (the same numbers as `generate` on it)."""
        handles = [self._new_handle(request, on_progress) for request in requests]
        with self._inbox_lock:
            self._inbox += [("submit", handle) for handle in handles]
        self._notify()
        return handles

    def abort(self, rid: str) -> None:
        """Finish every sequence of the requests with this rid (finish reason `abort`)."""
        self._post("abort", rid)

    def _post(self, kind: str, item: object) -> None:
        with self._inbox_lock:
            self._inbox.append((kind, item))
        self._notify()

    def _new_handle(self, request: GenerateRequest, on_progress) -> RequestHandle:
        if self.released:
            raise EngineReleased(f"request '{request.rid}': the engine's memory is released (engine.colocate: the "
                                 "trainer is using the GPU); call resume_memory() (POST /resume_memory_occupation) first")
        self.check_weights_written(f"request '{request.rid}'")
        return new_handle(request, on_progress, max_context_len=self.max_context_len,
                          eos_token_ids=self.eos_token_ids, blocks=self.blocks)

    # -- generation ------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerateRequest],
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        if self._paused.is_set():
            raise MilesError("the engine is paused; call resume() before generate()")
        handles = self.submit_all(requests, on_progress)
        if self._loop is None:
            with self._step_lock:
                self._num_answering_late += 1
            try:
                while not all(handle.done for handle in handles):
                    self.step()
            finally:
                with self._step_lock:
                    self._num_answering_late -= 1
                    self._answer_finished()  # others' requests finished in the last step
        return [handle.result() for handle in handles]

    def step(self) -> bool:
        """Run one scheduled forward; False when paused or idle."""
        with self._step_lock:
            self._drain_inbox()
            if self._pending is not None:
                if not self._paused.is_set() and self._step_ahead():
                    return True
                self._settle()
            # released: submissions wait for resume_memory
            rows = [] if self._paused.is_set() or self.released else self.scheduler.schedule()
            if not rows:
                self._answer_finished()
                return False
            with torch.inference_mode(), on_device(self.device):
                self._run(rows)
            return True

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        if inbox:  # what arrives sees the tokens computed so far, as in the plain order
            self._settle()
        for kind, item in inbox:
            if kind == "submit":
                self._handles[id(item)] = item
                leader, *forks = item.sequences
                leader.forks = forks
                self.scheduler.add(leader)
            else:
                self._abort(item)

    def _abort(self, rid: str) -> None:
        for handle in [h for h in self._handles.values() if h.request.rid == rid]:
            for seq in handle.sequences:
                if not seq.done:
                    seq.finish_reason = dict(ABORTED)
                    self._retire(seq)

    def _run(self, rows: list[Row]) -> None:
        decoding = self.scheduler.decoding
        logits_RV = self.runner.forward(rows, decoding=decoding)
        self._answer_finished()  # host work while the forward runs on a GPU
        self.scheduler.computed(rows)
        if decoding:  # every row samples from its own logits row; no decoding sequence has forks
            pending = self._launch_sample([row.seq for row in rows], logits_RV)
            if self._overlap:
                self._pending = pending  # read in the next step, once its forward is queued
            else:
                self._record_pending(pending)
            return
        sampled, logit_rows = [], []
        for index, row in enumerate(r for r in rows if r.completes):  # logits row `index`
            group = [row.seq, *self.scheduler.fork(row.seq)]  # a fresh prompt's n samples share it
            sampled += group
            logit_rows += [index] * len(group)
        if not sampled:
            return
        if len(logit_rows) == len(logits_RV) and logit_rows[-1] == len(logit_rows) - 1:
            self._sample(sampled, logits_RV)  # no forks (every decode step): the rows as they are
        else:
            self._sample(sampled, logits_RV.index_select(0, torch.tensor(logit_rows, device=logits_RV.device)))

    def _step_ahead(self) -> bool:
        """Launch the decode step after the pending one, then read the pending tokens while it
        runs (`overlap.py`); False when the scheduler cannot plan it blind."""
        pending = self._pending
        rows = self.scheduler.decode_rows_ahead(pending.seqs)
        if rows is None:
            return False
        with torch.inference_mode(), on_device(self.device):
            logits_RV = self.runner.forward(rows, decoding=True, fed=pending.tokens)
            self._pending = self._launch_sample([row.seq for row in rows], logits_RV)
            self._record_pending(pending)
            self._answer_finished()  # while the GPU runs the step just launched
        self.scheduler.computed([row for row in rows if not row.seq.done])  # after the fed tokens are in
        return True

    def _settle(self) -> None:
        """Read the pending decode step's tokens, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._record_pending(pending)

    def _sample(self, seqs: list[Seq], logits_BV: torch.Tensor) -> None:
        self._record_pending(self._launch_sample(seqs, logits_BV))

    def _launch_sample(self, seqs: list[Seq], logits_BV: torch.Tensor) -> PendingTokens:
        uniform = to_device(uniforms([seq.stream for seq in seqs]), logits_BV.device)
        temperature, top_k, top_p, flags = self._sampling_params.of([s.request.sampling for s in seqs],
                                                                       logits_BV.device)
        ops = model_ops(self.model)
        tokens, logprobs = sample_tokens(logits_BV, temperature, top_k, top_p, uniform, flags=flags,
                                         log_softmax=ops.log_softmax, fused=True, exact=ops.name == "invariant")
        return PendingTokens.start(seqs, tokens, logprobs)

    def _record_pending(self, pending: PendingTokens) -> None:
        tokens, logprobs = pending.read()
        seqs = pending.seqs
        if any(seq.done for seq in seqs):  # finished since it was launched (overlap, abort): token dropped
            kept = [i for i, seq in enumerate(seqs) if not seq.done]
            seqs, tokens, logprobs = [seqs[i] for i in kept], [tokens[i] for i in kept], [logprobs[i] for i in kept]
        self._record(seqs, tokens, logprobs)

    def _record(self, seqs: list[Seq], tokens: list[int], logprobs: list[float]) -> None:
        """Append each sequence's sampled token and its log-prob; retire those that stop."""
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            token_ids = seq.token_ids
            token_ids.append(token)
            seq.logprobs.append(logprob)
            # `finish_reason` is None unless a stop token, a stop string or the length limit can
            # apply: most rows of most steps skip the call (a per-row cost at every step).
            if token in seq.stop_ids or len(token_ids) >= seq.check_finish_from:
                seq.finish_reason = finish_reason(seq, token, self.eos_token_ids, self.tokenizer)
                if seq.done:
                    self._retire(seq)

    def _retire(self, seq: Seq) -> None:
        """Free a finished sequence; answer its request when it was the last one."""
        self.scheduler.finish(seq)
        handle = seq.handle
        if handle.on_progress:
            handle.on_progress(1)
        if all(s.done for s in handle.sequences) and not handle.done:
            del self._handles[id(handle)]
            self._finished.append((handle, self._weight_version))
            if not self._num_answering_late:
                self._answer_finished()

    def _answer_finished(self) -> None:
        while self._finished:  # one at a time: a failing answer leaves the others queued
            handle, version = self._finished.pop(0)
            handle.finish([to_generation(s, self.tokenizer, version, self.capture_routing) for s in handle.sequences])

    # -- background loop -------------------------------------------------------------------
    def start(self) -> None:
        """Step in a background thread whenever there is work (for a server)."""
        if self._loop is None:
            self._stop = False
            self._loop = threading.Thread(target=self._serve, name="miles-engine", daemon=True)
            self._loop.start()

    @property
    def is_running(self) -> bool:
        """Whether `start()`'s background loop is stepping the engine."""
        return self._loop is not None

    def stop(self) -> None:
        if self._loop is not None:
            self._stop = True
            self._notify()
            self._loop.join()
            self._loop = None

    def _serve(self) -> None:
        while not self._stop:
            if not self.step():
                with self._wake:
                    self._wake.wait(timeout=0.05)

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

