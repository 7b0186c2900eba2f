"""Token streaming's progress reports: what moved in the engine's running requests since the last
report, read from the lists the engine thread appends to (`BatchingWorker.stream`)."""

from __future__ import annotations

from dataclasses import dataclass

from miles_core.engine.protocol import Generation


@dataclass
class StreamUpdate:
    """Progress of one sequence: flat index `i * n + j` (prompt i, sample j), its output ids so far,
    and its `Generation` once the whole request has finished (then `output_ids` is the final list)."""

    index: int
    request_index: int
    output_ids: list[int]
    output_logprobs: list[float]
    generation: Generation | None = None


def stream_updates(handles: list, sent: dict[int, int]) -> list[StreamUpdate]:
    """What moved since `sent`: new output ids of running sequences, the final answer of finished
    requests (each once). Reads lists the engine thread appends to; a copy is a consistent prefix."""
    updates, flat = [], 0
    for i, handle in enumerate(handles):
        done = handle.done  # read first: generations are complete once `done` is seen
        for j, seq in enumerate(handle.sequences):
            index, flat = flat, flat + 1
            if sent.get(index) == -1:
                continue
            if done:
                gen = handle.generations[j]
                updates.append(StreamUpdate(index, i, list(gen.output_ids), list(gen.output_logprobs), gen))
                sent[index] = -1
                continue
            ids, logprobs = seq.output_ids, list(seq.logprobs)  # a token lands before its logprob
            ids = ids[:len(logprobs)]
            if len(ids) > sent.get(index, 0):
                updates.append(StreamUpdate(index, i, ids, logprobs[:len(ids)]))
                sent[index] = len(ids)
    return updates
