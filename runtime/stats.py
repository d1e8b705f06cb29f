"""Statistics of one generation, named the way vLLM / onnxruntime-genai / llama.cpp report them.

acceptance_rate = accepted / draft tokens; mean_accepted_length (block efficiency) = 1 + accepted / rounds, i.e.
tokens per target call; per-position acceptance = fraction of rounds that drafted a j-th token and accepted it.
Time: ORT time is measured inside the sessions' run calls; orchestration = wall - target - draft (NumPy, Python).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    algo: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = ""  # "length" | "eos" | "stop" | "cancelled"
    rounds: int = 0  # decode rounds (one target verification each)
    target_calls: int = 0
    draft_calls: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafted_at: list[int] = field(default_factory=list)  # rounds that drafted a j-th token
    accepted_at: list[int] = field(default_factory=list)  # rounds that accepted their j-th token
    target_time_s: float = 0.0  # inside target session run calls
    draft_time_s: float = 0.0  # inside draft session run calls
    prefill_time_s: float = 0.0  # wall time of prompt processing (both models)
    decode_time_s: float = 0.0  # wall time of the decode rounds
    ttft_s: float = 0.0  # time to the first generated token
    wall_time_s: float = 0.0
    energy: dict | None = None  # filled by the energy accounting when a meter is active
    controller: list[dict] | None = None  # the power controller's decisions, when a budget steered the run

    def record_round(self, drafted: int, accepted: int) -> None:
        """Count one round that drafted `drafted` tokens and accepted the first `accepted` of them."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted={accepted} must be within 0..drafted={drafted}")
        self.rounds += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        grow = drafted - len(self.drafted_at)
        if grow > 0:
            self.drafted_at += [0] * grow
            self.accepted_at += [0] * grow
        for j in range(drafted):
            self.drafted_at[j] += 1
        for j in range(accepted):
            self.accepted_at[j] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.accepted_tokens / self.rounds if self.rounds else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / d for a, d in zip(self.accepted_at, self.drafted_at)]

    @property
    def orchestration_time_s(self) -> float:
        return max(0.0, self.wall_time_s - self.target_time_s - self.draft_time_s)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_time_s if self.decode_time_s else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("drafted_at", "accepted_at", "energy", "controller")}
        d.update(acceptance_rate=self.acceptance_rate, mean_accepted_length=self.mean_accepted_length,
                 per_position_acceptance=self.per_position_acceptance,
                 orchestration_time_s=self.orchestration_time_s, tokens_per_s=self.tokens_per_s,
                 decode_tokens_per_s=self.decode_tokens_per_s)
        if self.energy is not None:
            d["energy"] = dict(self.energy)
        if self.controller is not None:
            d["controller"] = list(self.controller)
        return d
