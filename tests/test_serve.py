"""`mjsd serve` tested as users run it: real servers on free loopback ports, talked to with the official `openai`
client (and plain HTTP where a client would hide the detail).

- builtin_server: `mjsd serve` subprocess on the built-in bundle (completions, streaming, concurrency, errors,
  disconnects, equality with `mjsd generate`);
- chat_server: `mjsd serve` subprocess on a tiny bundle exported from a checkpoint with a chat template, behind an
  API key (chat, 401, SIGTERM);
- an in-process uvicorn server whose engine the test blocks (holding its turn), for the queue limit and timeout.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from mjsd.runtime.cli import main
from mjsd.runtime.config import GenerationConfig
from mjsd.runtime.server.chat import load_chat_template, render_chat
from mjsd.runtime.server.protocol import releasable

MODEL = "mjsd-builtin"
PROMPT = "def parse(path):"
# role tags, BOS/EOS as strings, raise_exception on a role it does not know, add_generation_prompt
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
            "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
# Online tuning (when the engine has it) carries gamma from one generation to the next: off where results must repeat.
NO_TUNE = {"tune": False} if "tune" in GenerationConfig.__dataclass_fields__ else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mjsd serve ARGS` in a subprocess on a free loopback port; stderr (the request log) kept in a file."""

    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        self.proc = subprocess.Popen([sys.executable, "-c", "from mjsd.runtime.cli import main; main()", "serve",
                                      "--port", str(self.port), *args],
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(self.url + "/health", timeout=2).status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mjsd serve did not come up:\n{self.log.read_text()}")
            time.sleep(0.2)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def metric(self, name: str) -> float:
        """The sum of a Prometheus sample over its label sets matching `name` (a regex over name{labels})."""
        text = urllib.request.urlopen(self.url + "/metrics", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if not line.startswith("#") and re.fullmatch(name, line.rsplit(" ", 1)[0]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def builtin_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("serve"), "--max-queue", "24")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chat_bundle(llama_checkpoints, tmp_path_factory):
    """The tiny Llama pair exported again, its tokenizer now carrying a chat template."""
    from transformers import AutoTokenizer

    from mjsd.export import export_bundle

    root = tmp_path_factory.mktemp("chat")
    pair = []
    for src in llama_checkpoints:
        dst = shutil.copytree(src, root / src.name)
        tok = AutoTokenizer.from_pretrained(dst)
        tok.chat_template = TEMPLATE
        tok.save_pretrained(dst)
        pair.append(dst)
    export_bundle(pair[0], pair[1], root / "bundle", progress=False, validate=False)
    return root / "bundle"


@pytest.fixture(scope="module")
def chat_server(chat_bundle, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("serve-chat"), "--bundle", str(chat_bundle), "--api-key", "secret",
                    "--grace-period", "20")
    yield server
    server.stop()


# --- pure parts ---------------------------------------------------------------------------------------------------

def test_stop_strings_are_cut_and_held_back():
    assert releasable("abc STOP def", ("STOP",), final=False) == ("abc ", True)
    assert releasable("abc ST", ("STOP",), final=False) == ("abc ", False)  # may still become STOP
    assert releasable("abc ST", ("STOP",), final=True) == ("abc ST", False)
    assert releasable("abc", (), final=False) == ("abc", False)
    assert releasable("x\n\ny", ("\n\n", "y"), final=False) == ("x", True)  # the earliest stop wins


def test_export_keeps_the_chat_template_and_rendering_matches_transformers(chat_bundle, llama_checkpoints):
    from transformers import AutoTokenizer

    template, specials = load_chat_template(chat_bundle / "tokenizer")
    assert template == TEMPLATE
    tok = AutoTokenizer.from_pretrained(chat_bundle / "tokenizer")
    assert render_chat(template, MESSAGES, specials) == tok.apply_chat_template(MESSAGES, tokenize=False,
                                                                                add_generation_prompt=True)
    assert load_chat_template(llama_checkpoints[0])[0] is None  # the plain checkpoints have none
    with pytest.raises(ValueError, match="unknown role tool"):
        render_chat(template, [{"role": "tool", "content": "x"}], specials)


# --- the built-in bundle ----------------------------------------------------------------------------------------------

def test_health_and_models(builtin_server):
    health = json.load(urllib.request.urlopen(builtin_server.url + "/health"))
    assert health["status"] == "ok" and health["model"] == MODEL
    [card] = builtin_server.client().models.list().data
    assert card.id == MODEL and card.owned_by == "mjsd"
    extra = card.model_extra
    assert {"mtad", "mmtad", "ar"} <= set(extra["algorithms"]) and extra["graph"] == "tree-attention"
    assert extra["max_model_len"] == 512 and extra["chat_template"] is False


def test_completion_equals_mjsd_generate_with_a_fixed_seed(builtin_server):
    res = builtin_server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0.8,
                                                     top_p=0.95, seed=7,
                                                     extra_body={"algo": "mtad", "top_k": 20, **NO_TUNE})
    cli = CliRunner().invoke(main, ["generate", PROMPT, "--json", "-n", "20", "--temperature", "0.8", "--top-p",
                                    "0.95", "--top-k", "20", "--seed", "7", "--algo", "mtad"]
                             + (["--no-tune"] if NO_TUNE else []))
    assert cli.exit_code == 0, cli.output
    expected = json.loads(cli.output)
    [choice] = res.choices
    assert choice.text == expected["text"] and choice.finish_reason == "length"
    assert res.usage.completion_tokens == len(expected["tokens"]) == 20
    assert res.usage.prompt_tokens == expected["stats"]["prompt_tokens"]
    stats = res.usage.model_extra["mjsd"]
    assert stats["algo"] == "mtad" and 0 <= stats["acceptance_rate"] <= 1 and stats["mean_accepted_length"] >= 1
    assert stats["tokens_per_s"] > 0 and stats["energy"]["j_per_token"] > 0 and stats["energy"]["source"]


def test_streamed_completion_is_the_same_text(builtin_server):
    client = builtin_server.client()
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0.0, extra_body={"algo": "sps"})
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) >= 2 and "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert len({c.id for c in chunks}) == 1


def test_stop_strings_end_the_text_before_them(builtin_server):
    client = builtin_server.client()
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0.0, extra_body=NO_TUNE)
    full = client.completions.create(**args).choices[0].text
    stop = full[10:14]
    assert stop.strip()
    res = client.completions.create(stop=[stop], **args).choices[0]
    assert res.finish_reason == "stop" and res.text == full[:full.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **args))
    assert streamed == res.text


def test_sixteen_concurrent_clients_all_answered_as_if_alone(builtin_server):
    client = builtin_server.client()

    def ask(seed: int, stream: bool = False) -> str:
        args = dict(model=MODEL, prompt=f"def f{seed}(x):", max_tokens=12, temperature=1.0, seed=seed,
                    extra_body=NO_TUNE)
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **args))
        return client.completions.create(**args).choices[0].text

    alone = [ask(seed) for seed in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda s: ask(s, stream=s % 2 == 1), range(16)))
    assert together == alone
    assert builtin_server.metric(r"mjsd_requests_running") == 0


@pytest.mark.parametrize("body, status, words", [
    ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n=2"),
    ({"model": MODEL, "prompt": "x", "algo": "beam"}, 400, "algo"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, "context"),
    ({"model": MODEL, "prompt": [1, 99999]}, 400, "token ids"),
    ({"model": MODEL}, 400, "prompt"),
])
def test_bad_requests_get_an_error_object(builtin_server, body, status, words):
    req = urllib.request.Request(builtin_server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == status
    error = json.loads(e.value.read())["error"]
    assert words in error["message"] and error["type"]


def test_openai_client_raises_on_errors(builtin_server):
    client = builtin_server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="x " * 600, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_a_client_that_disconnects_cancels_its_generation(builtin_server):
    client = builtin_server.client()
    before = builtin_server.metric(r"mjsd_generation_tokens_total")
    long = dict(model=MODEL, prompt=PROMPT, max_tokens=400, temperature=0.0, extra_body={"algo": "ar",
                                                                                         "ignore_eos": True})
    stream = client.completions.create(stream=True, **long)
    next(iter(stream))
    stream.close()  # streamed: the connection is closed after the first chunk
    with pytest.raises(openai.APITimeoutError):  # not streamed: the client gives up after 0.3 s
        client.with_options(timeout=0.3).completions.create(**long)
    deadline = time.monotonic() + 30
    while builtin_server.metric(r'mjsd_requests_total\{endpoint="/v1/completions",status="499"\}') < 2:
        assert time.monotonic() < deadline, "the disconnects were not seen"
        time.sleep(0.1)
    generated = builtin_server.metric(r"mjsd_generation_tokens_total") - before
    assert generated < 2 * 400  # both stopped early
    assert builtin_server.metric(r"mjsd_requests_running") == 0
    assert "client disconnected" in builtin_server.log.read_text()


def test_metrics_and_one_log_line_per_request(builtin_server):
    text = urllib.request.urlopen(builtin_server.url + "/metrics").read().decode()
    for name in ("mjsd_requests_total", "mjsd_generation_tokens_total", "mjsd_spec_decode_acceptance_rate",
                 "mjsd_queue_depth", "mjsd_target_time_seconds_total", "mjsd_draft_time_seconds_total",
                 "mjsd_energy_joules_total", "mjsd_joules_per_token", "mjsd_power_watts",
                 "mjsd_time_to_first_token_seconds_bucket"):
        assert name in text, name
    assert 'source="' in text
    lines = [line for line in builtin_server.log.read_text().splitlines() if " /v1/completions 200 " in line]
    assert lines and all(re.search(r"cmpl-\w+ .* completion=\d+ .* \d+ ms .* J", line) for line in lines)
    assert len(lines) == builtin_server.metric(r'mjsd_requests_total\{endpoint="/v1/completions",status="200"\}')


# --- a bundle with a chat template, behind an API key ----------------------------------------------------------------

def test_chat_with_the_bundles_template(chat_server, chat_bundle):
    from transformers import AutoTokenizer

    from mjsd.runtime import Engine

    with pytest.raises(openai.AuthenticationError):
        chat_server.client(api_key="wrong").models.list()
    client = chat_server.client(api_key="secret")
    model = client.models.list().data[0].id
    res = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0.0,
                                         extra_body=NO_TUNE)
    msg = res.choices[0].message
    assert msg.role == "assistant" and res.object == "chat.completion"
    # the same as the engine on transformers' rendering of the conversation
    ids = AutoTokenizer.from_pretrained(chat_bundle / "tokenizer").apply_chat_template(MESSAGES,
                                                                                      add_generation_prompt=True)
    expected = Engine.from_bundle(chat_bundle, meter=None).generate(ids, max_new_tokens=8, temperature=0.0, **NO_TUNE)
    assert msg.content == expected.text and res.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0.0,
                                                 stream=True, extra_body=NO_TUNE))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model=model, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])


def test_sigterm_finishes_in_flight_work_and_exits_cleanly(chat_server):
    client = chat_server.client(api_key="secret")
    model = client.models.list().data[0].id
    stream = client.completions.create(model=model, prompt="hello", max_tokens=200, temperature=0.0, stream=True,
                                       extra_body={"algo": "ar", "ignore_eos": True})
    it = iter(stream)
    first = next(it)
    chat_server.proc.send_signal(signal.SIGTERM)
    rest = list(it)  # the in-flight stream is finished, not cut
    assert [c.choices[0].finish_reason for c in [first, *rest]][-1] == "length"
    assert chat_server.proc.wait(30) == 0
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
    log = chat_server.log.read_text()
    assert "Traceback" not in log and "stopped" in log


# --- the queue bound and the timeout, on an engine the test holds ---------------------------------------------------

def test_full_queue_gets_429_and_slow_requests_504(llama_bundle):
    import uvicorn

    from mjsd.runtime import Engine
    from mjsd.runtime.server import Settings, create_app

    engine = Engine.from_bundle(llama_bundle, meter=None)
    app = create_app(engine, Settings(max_queue=2, timeout_s=1.0, model_id="tiny"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        with ThreadPoolExecutor(2) as pool, engine.turns.turn():  # every generation waits for this turn
            waiting = [pool.submit(client.completions.create, model="tiny", prompt="ab", max_tokens=4)
                       for _ in range(2)]
            deadline = time.monotonic() + 10
            while len(app.state.runner.jobs) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError, match="busy"):
                client.completions.create(model="tiny", prompt="ab", max_tokens=4)
            for f in waiting:
                with pytest.raises(openai.InternalServerError, match="timeout"):  # 504
                    f.result(10)
        deadline = time.monotonic() + 10
        while app.state.runner.jobs:  # the timed-out generations stop once they have a turn
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # then the queue has room again (asked before they had stopped, this raced them for the queue: a 429)
        assert client.completions.create(model="tiny", prompt="ab", max_tokens=4).choices[0].text is not None
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_busy_port_is_one_clear_error(llama_bundle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        res = CliRunner().invoke(main, ["serve", "--bundle", str(llama_bundle), "--port", str(s.getsockname()[1]),
                                        "--meter", "none"])
    assert res.exit_code == 1 and "cannot listen on 127.0.0.1" in res.output and "--port" in res.output


def test_the_load_test_tool_runs_against_a_server(builtin_server, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("loadtest", Path(__file__).parents[1] / "tools" / "loadtest.py")
    loadtest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loadtest)
    out = tmp_path / "load.json"
    assert loadtest.main(["--url", builtin_server.url, "--server-pid", str(builtin_server.proc.pid), "--requests",
                          "24", "--concurrency", "4", "--max-tokens", "4", "--prompts", "4", "--extra",
                          json.dumps(NO_TUNE), "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["completed"] == 24 and s["server_counted_200"] == 24 and s["mismatched"] == 0
    assert s["latency_ms"]["p50"] > 0 and s["rss_mib"]["after"] > 0
    assert "| latency p50 / p95 / p99 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="loopback"):
        loadtest.main(["--url", "http://example.com:8080"])
