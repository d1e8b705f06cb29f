"""Prometheus metrics of the server (GET /metrics), named after vLLM's where one exists.

Energy per request is the generation's own (its rounds, waits left out; Engine docs); device power is the average
since the previous scrape, read from the same meters by a server-wide sampler. Estimated figures carry
source="estimated".
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine, runner, power_budget: float | None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mjsd_requests", "Requests by endpoint and HTTP status (499: the client went away)",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mjsd_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("mjsd_generation_tokens", "Tokens generated", registry=r)
        self.draft_tokens = Counter("mjsd_spec_decode_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted_tokens = Counter("mjsd_spec_decode_accepted_tokens", "Draft tokens accepted", registry=r)
        self.rounds = Counter("mjsd_decode_rounds", "Decode rounds (one target verification each)", registry=r)
        self._accepted = self._drafted = 0  # the counters' values, for the ratio gauges
        self._energy: dict[str, list[float]] = {}  # source -> [joules, tokens]
        Gauge("mjsd_spec_decode_acceptance_rate", "Accepted / draft tokens since start", registry=r).set_function(
            lambda: self._accepted / self._drafted if self._drafted else 0.0)
        Gauge("mjsd_requests_running", "Generations admitted (running or waiting for their turn)",
              registry=r).set_function(lambda: len(runner.jobs))
        Gauge("mjsd_queue_depth", "Generations waiting for their turn at the engine", registry=r).set_function(
            lambda: engine.turns.waiting)
        self.target_time = Counter("mjsd_target_time_seconds", "Time inside target model calls", registry=r)
        self.draft_time = Counter("mjsd_draft_time_seconds", "Time inside draft model calls", registry=r)
        self.energy = Counter("mjsd_energy_joules", "Energy of the generations' own rounds", ["source"], registry=r)
        self.j_per_token = Gauge("mjsd_joules_per_token", "Energy per generated token since start", ["source"],
                                 registry=r)
        self.power = Gauge("mjsd_power_watts", "Average device power since the previous scrape", ["source"],
                           registry=r)
        if power_budget is not None:  # absent when there is none
            Gauge("mjsd_power_budget_watts", "The power budget the controller steers to", registry=r).set(power_budget)
        self.ttft = Histogram("mjsd_time_to_first_token_seconds", "Time to the first token, queueing included",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("mjsd_e2e_request_latency_seconds", "Request latency", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self._sampler = self._last = None
        if engine.meters:
            from ..energy import Sampler

            self._sampler = Sampler(engine.meters, hz=engine.sample_hz)
            self._last = self._sampler.start()

    def observe(self, endpoint: str, status: int, stats=None, seconds: float | None = None,
                ttft: float | None = None) -> None:
        """Count one finished request; `stats` when a generation ran; times from the request's arrival."""
        self.requests.labels(endpoint, str(status)).inc()
        if status == 200 and seconds is not None:
            self.latency.observe(seconds)
        if status == 200 and ttft is not None:
            self.ttft.observe(ttft)
        if stats is None:
            return
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.generated_tokens)
        self.draft_tokens.inc(stats.draft_tokens)
        self.accepted_tokens.inc(stats.accepted_tokens)
        self._drafted += stats.draft_tokens
        self._accepted += stats.accepted_tokens
        self.rounds.inc(stats.rounds)
        self.target_time.inc(stats.target_time_s)
        self.draft_time.inc(stats.draft_time_s)
        e = stats.energy
        if e and e.get("energy_j") is not None:
            source = e.get("source", "unknown")
            self.energy.labels(source).inc(e["energy_j"])
            total = self._energy.setdefault(source, [0.0, 0])
            total[0] += e["energy_j"]
            total[1] += stats.generated_tokens
            if total[1]:
                self.j_per_token.labels(source).set(total[0] / total[1])

    def render(self) -> bytes:
        if self._sampler is not None:
            mark = self._sampler.mark()
            if mark.t > self._last.t:
                self.power.labels(self._sampler.meter.name).set(
                    (mark.energy_j - self._last.energy_j) / (mark.t - self._last.t))
            self._last = mark
        return generate_latest(self.registry)

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()

