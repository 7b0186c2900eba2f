"""`remote_rm`: the reward comes from an HTTP service (slime's `--rm-type remote_rm --rm-url URL`).

Each sample is POSTed as JSON `{"prompt": ..., "response": ..., "label": ...}` (slime's payload) to
`reward.remote_url`; the JSON answer is the reward: a number, or a dict whose `reward.key` entry
(else `reward`) is the scalar, as for any reward function. Calls are async, at most
`reward.max_concurrency` in flight, each bounded by `reward.timeout` (`compute.py`); a non-2xx
status, a body that is not JSON, a refused connection or a timeout scores 0 and counts as a
reward failure. Deviation: slime retries a failed call up to 10 times with exponential back-off
(up to ~30 s each); miles does not retry, so a dead server shows at once in
`reward.max_failure_fraction`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from miles_core.config import RewardConfig
from miles_core.sample import Sample


@dataclass(frozen=True)
class RemoteReward:
    url: str
    """Where each sample is POSTed."""

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> RemoteReward:
        return cls(url=cfg.remote_url)

    async def __call__(self, sample: Sample) -> Any:
        from miles_core.utils.http import async_client

        payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
        # One client per call: `compute_rewards` runs each batch in a fresh event loop. No client
        # timeout: `compute.py` bounds the whole call by reward.timeout (0: none).
        async with async_client(timeout=None) as client:
            answer = await client.post(self.url, json=payload)
            answer.raise_for_status()
            return answer.json()
