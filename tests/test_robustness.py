"""Bad input of every kind gets one clear line and loses nothing (issue 12).

Cases: crafted and damaged bundles (every way a path can leave the bundle, edited dimensions, unknown dtype, a broken
tokenizer, unreadable files), the CLI (non-finite numbers, invalid UTF-8, usage errors, device profiles, Ctrl-C),
the Python API (token ids that are not integers, non-finite parameters) and the export install step; plus property
tests over random GenerationConfig values. Each case asserts the error class or exit code, a one-line message naming
the cause, no traceback, and that nothing was written or lost. An audit hook records every file Python opens, to
show that nothing outside a crafted bundle is read. MJSD_ROBUSTNESS_TABLE=path writes the table of cases (case,
expected, observed) as Markdown.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from mjsd.runtime import BundleError, ConfigError, Engine, GenerationConfig, MjsdError
from mjsd.runtime.bundle import MANIFEST, external_data_locations, load_bundle, sha256_file
from mjsd.runtime.cli import main

ROWS: list[tuple[str, str, str]] = []  # (case, expected, observed): the robustness table


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    path = os.environ.get("MJSD_ROBUSTNESS_TABLE")
    if path:
        lines = ["| case | expected | observed |", "|---|---|---|"]
        rows = {c: (e, o) for c, e, o in reversed(ROWS)}  # one row per case (bundle fixtures may be parametrized)
        lines += [f"| {c} | {e} | {o.replace('|', '/')} |" for c, (e, o) in reversed(rows.items())]
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def record(case: str, expected: str, observed: str) -> None:
    ROWS.append((case, expected, observed))


# --- what Python opens: an audit hook (cannot be removed; it records only inside `opened()`) ---------------------------
_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextmanager
def opened():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def snapshot(*dirs: Path) -> dict:
    """Every path under the folders with its kind, size and mtime: equal snapshots = nothing written or lost."""
    state = {}
    for d in dirs:
        for p in sorted([d, *d.rglob("*")]) if d.exists() else []:
            st = p.lstat()
            state[str(p)] = (p.is_symlink(), st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return state


def one_line(text: str) -> str:
    assert "Traceback" not in text and "internal error" not in text, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


def cli_error(res, code: int) -> str:
    """The CLI failed with `code`, one 'error: ...' line on stderr, no traceback."""
    assert res.exit_code == code, (res.exit_code, res.output)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    line = one_line(res.stderr)
    assert line.startswith("error: "), line
    return line


# --- bundles ----------------------------------------------------------------------------------------------------------

def _manifest(b: Path) -> dict:
    return json.loads((b / MANIFEST).read_text())


def _write_manifest(b: Path, m: dict) -> None:
    (b / MANIFEST).write_text(json.dumps(m, indent=1))


def _edit(fn):
    def apply(b: Path, outside: Path) -> None:
        m = _manifest(b)
        fn(m, b, outside)
        _write_manifest(b, m)
    return apply


def _rehash(b: Path, m: dict, role: str, rel: str) -> None:
    files = m["models"][role]["files"] if role in ("target", "draft") else m["tokenizer"]["files"]
    files[rel] = sha256_file(b / rel)


def _symlink_graph_outside(b, outside):
    """target/model.onnx -> an identical copy outside: the sha256 matches, only containment can refuse it."""
    shutil.copy(b / "target" / "model.onnx", outside / "model.onnx")
    (b / "target" / "model.onnx").unlink()
    (b / "target" / "model.onnx").symlink_to(outside / "model.onnx")


def _symlink_tokenizer_dir_outside(b, outside):
    shutil.copytree(b / "tokenizer", outside / "tokenizer")
    shutil.rmtree(b / "tokenizer")
    (b / "tokenizer").symlink_to(outside / "tokenizer", target_is_directory=True)


def _symlink_manifest_outside(b, outside):
    shutil.move(b / MANIFEST, outside / MANIFEST)
    (b / MANIFEST).symlink_to(outside / MANIFEST)


def _garbage_tokenizer(b, outside):
    (b / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    m = _manifest(b)
    _rehash(b, m, "tokenizer", "tokenizer/tokenizer.json")
    _write_manifest(b, m)


def _truncated_graph(b, outside):
    g = b / "draft" / "model.onnx"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    m = _manifest(b)
    _rehash(b, m, "draft", "draft/model.onnx")
    _write_manifest(b, m)


def _add_file(rel_fn):
    return _edit(lambda m, b, o: m["models"]["draft"]["files"].update({rel_fn(o): "0" * 64}))


# (case, corruption, expected message): refused by load_bundle, i.e. by every command before anything runs
LOAD_CASES = [
    ("files entry: absolute path to an outside file", _add_file(lambda o: str(o / "secret.bin")), "is an absolute path"),
    ("model path: absolute", _edit(lambda m, b, o: m["models"]["target"].update(
        path=str(o / "secret.bin"), files={**m["models"]["target"]["files"], str(o / "secret.bin"): "0" * 64})),
     "is an absolute path"),
    ("chain graph path: absolute", _edit(lambda m, b, o: m["models"]["target"].update(
        chain_path=str(o / "secret.bin"), graph_kind="fused",
        files={**m["models"]["target"]["files"], str(o / "secret.bin"): "0" * 64})), "is an absolute path"),
    ("chain graph path: not listed", _edit(lambda m, b, o: m["models"]["target"].update(chain_path="../secret.bin")),
     "chain_path must name a listed graph file"),
    ("tokenizer path: absolute", _edit(lambda m, b, o: m["tokenizer"].update(
        path=str(o / "secret.bin"), files={**m["tokenizer"]["files"], str(o / "secret.bin"): "0" * 64})),
     "is an absolute path"),
    ("files entry: '..' escaping the root", _add_file(lambda o: "../outside/secret.bin"), "contains '..'"),
    ("files entry: '..' inside the root", _add_file(lambda o: "draft/../draft/model.onnx"), "contains '..'"),
    ("files entry: Windows drive path", _add_file(lambda o: "C:\\secret.bin"), "is an absolute path"),
    ("files entry: NUL byte", _add_file(lambda o: "draft/model.onnx\x00.txt"), "is not a file name"),
    ("graph: symlink to an identical outside copy", _symlink_graph_outside, "resolves through a symlink"),
    ("tokenizer/: symlinked directory outside", _symlink_tokenizer_dir_outside, "resolves through a symlink"),
    ("bundle.json: symlink outside", _symlink_manifest_outside, "resolves through a symlink"),
    ("unlisted file: symlink outside (a chat template)",
     lambda b, o: (b / "tokenizer" / "chat_template.jinja").symlink_to(o / "secret.bin"), "resolves through a symlink"),
    ("symlink loop", lambda b, o: (b / "draft" / "loop").symlink_to(b / "draft" / "loop"), "is a symlink loop"),
    ("manifest: unknown dtype bfloat16", _edit(lambda m, b, o: m["models"]["draft"].update(dtype="bfloat16")),
     "is not a KV cache dtype"),
    ("manifest: not JSON", lambda b, o: (b / MANIFEST).write_text("{not json"), "is not valid JSON"),
    ("manifest: a JSON array", lambda b, o: (b / MANIFEST).write_text("[]"), "must be a JSON object"),
    ("manifest: invalid UTF-8", lambda b, o: (b / MANIFEST).write_bytes(b'{"format": "\xff"}'), "is not valid JSON"),
    ("tokenizer.json: does not parse (sha256 updated)", _garbage_tokenizer, "cannot parse it"),
    ("graph: truncated protobuf (sha256 updated)", _truncated_graph, "is not a valid ONNX file"),
    ("manifest: tokenizer.path not among its files", _edit(lambda m, b, o: m["tokenizer"].update(
        path="tokenizer/tokenizer_config.json", files={"tokenizer/tokenizer.json": m["tokenizer"]["files"][
            "tokenizer/tokenizer.json"]})), "does not list tokenizer.path"),
]


@pytest.fixture
def damaged(tiny_vocab_bundle, tmp_path):
    """A private copy of a tiny bundle and an `outside` folder with a secret file beside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"root:x:0:0:secret\n")
    return shutil.copytree(tiny_vocab_bundle, tmp_path / "bundle", symlinks=True), outside


@pytest.mark.parametrize("case, corrupt, message", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_bundle_refused_at_load_before_reading_outside(damaged, case, corrupt, message):
    bundle, outside = damaged
    corrupt(bundle, outside)
    before = snapshot(bundle, outside)
    with opened() as files:
        with pytest.raises(BundleError, match=message) as err:
            load_bundle(bundle)
    assert not [f for f in files if Path(f).is_relative_to(outside.resolve())], files  # not a byte read outside
    one_line(str(err.value))
    res = CliRunner().invoke(main, ["inspect", str(bundle)])  # `mjsd inspect` says why
    line = cli_error(res, 1)
    assert message in line and ("mjsd export" in line or "chmod" in line), line  # the cause and the fix
    assert snapshot(bundle, outside) == before
    record(f"bundle: {case}", f"BundleError at load, exit 1: '{message}'", line)


# (case, manifest edit, expected): the manifest is consistent, the graph disagrees; refused when a session opens it
SESSION_CASES = [
    ("manifest: num_layers edited", lambda m: m["models"]["target"].update(num_layers=m["models"]["target"][
        "num_layers"] + 1), "num_layers"),
    ("manifest: head_dim edited", lambda m: m["models"]["draft"].update(head_dim=m["models"]["draft"]["head_dim"] * 2),
     "head_dim"),
    ("manifest: num_kv_heads edited", lambda m: m["models"]["target"].update(num_kv_heads=m["models"]["target"][
        "num_kv_heads"] + 1), "num_kv_heads"),
    ("manifest: dtype float16 on a float32 graph", lambda m: m["models"]["draft"].update(dtype="float16"), "dtype"),
    ("manifest: logit width edited", lambda m: m["models"]["target"].update(vocab_size=m["models"]["target"][
        "vocab_size"] + 1), "vocab_size"),
]


@pytest.mark.parametrize("case, edit, field", SESSION_CASES, ids=[c[0] for c in SESSION_CASES])
def test_manifest_disagreeing_with_the_graph_is_one_line(damaged, case, edit, field):
    bundle, _ = damaged
    m = _manifest(bundle)
    edit(m)
    _write_manifest(bundle, m)
    with pytest.raises(BundleError, match=f"the manifest says {field}=.* but the graph has"):
        Engine.from_bundle(bundle, meter=None)
    res = CliRunner().invoke(main, ["generate", "a b", "--bundle", str(bundle), "-n", "2"])
    line = cli_error(res, 1)
    assert field in line and "re-export" in line
    record(f"bundle: {case}", "BundleError when the session opens, exit 1", line)


def test_symlinks_that_stay_inside_are_fine(damaged):
    bundle, _ = damaged
    (bundle / "tokenizer" / "alias.json").symlink_to("tokenizer.json")
    (bundle / "draft-link").symlink_to("draft", target_is_directory=True)
    assert load_bundle(bundle).draft.num_layers >= 1


def test_unreadable_file_is_one_line(damaged):
    bundle, _ = damaged
    graph = bundle / "draft" / "model.onnx"
    graph.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(BundleError) as err:
            load_bundle(bundle)
        line = one_line(str(err.value))
    else:  # root reads anything: ask a child that dropped to nobody (fork: no interpreter to start from /root)
        public = Path(os.environ.get("TMPDIR", "/tmp")) / f"mjsd-unreadable-{os.getpid()}"
        shutil.copytree(bundle, public / "bundle")
        try:
            os.chmod(public, 0o755)
            (public / "bundle" / "draft" / "model.onnx").chmod(0)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os.close(read)
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    load_bundle(public / "bundle")
                    msg = "loaded"
                except BundleError as e:
                    msg = str(e)
                except BaseException as e:
                    msg = f"{type(e).__name__}: {e}"
                os.write(write, msg.encode())
                os._exit(0)
            os.close(write)
            with os.fdopen(read) as f:
                line = one_line(f.read())
            os.waitpid(pid, 0)
        finally:
            shutil.rmtree(public, ignore_errors=True)
    assert "cannot read draft/model.onnx" in line and "Permission denied" in line and "chmod" in line, line
    record("bundle: graph file unreadable (mode 000)", "BundleError at load naming the file and chmod", line)


# --- external data: weights in a file beside the graph, named inside the protobuf ------------------------------------

@pytest.fixture(scope="module")
def external_bundle(tiny_vocab_bundle, tmp_path_factory):
    """The tiny bundle with the draft's weights moved into draft/weights.bin (listed and hashed): a valid bundle."""
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import convert_model_to_external_data

    b = shutil.copytree(tiny_vocab_bundle, tmp_path_factory.mktemp("external") / "bundle")
    model = onnx.load(str(b / "draft" / "model.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=512)
    onnx.save_model(model, str(b / "draft" / "model.onnx"))
    m = _manifest(b)
    for rel in ("draft/model.onnx", "draft/weights.bin"):
        _rehash(b, m, "draft", rel)
    _write_manifest(b, m)
    return b


def test_external_data_parser_agrees_with_onnx_and_a_valid_bundle_runs(external_bundle):
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    graph = external_bundle / "draft" / "model.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    theirs = sorted(e.value for t in _get_all_tensors(model) if uses_external_data(t)
                    for e in t.external_data if e.key == "location")
    assert theirs and sorted(external_data_locations(graph)) == theirs
    r = Engine.from_bundle(external_bundle, meter=None).generate("a b", algo="sps", max_new_tokens=4, ignore_eos=True)
    assert len(r.tokens) == 4


def _relocate(location_of):
    """Point every external-data location of the draft graph at location_of(outside), moving weights.bin there."""
    def apply(b: Path, outside: Path) -> None:
        import onnx

        graph = b / "draft" / "model.onnx"
        model = onnx.load(str(graph), load_external_data=False)
        loc, listed = location_of(b, outside)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = loc
        graph.write_bytes(model.SerializeToString())
        m = _manifest(b)
        _rehash(b, m, "draft", "draft/model.onnx")
        if not listed:
            del m["models"]["draft"]["files"]["draft/weights.bin"]
        _write_manifest(b, m)
    return apply


def _escape_by_symlink(b, outside):
    shutil.move(b / "draft" / "weights.bin", outside / "weights.bin")
    (b / "draft" / "weights.bin").symlink_to(outside / "weights.bin")
    return "weights.bin", True


EXTERNAL_CASES = [
    ("external data: absolute location", _relocate(lambda b, o: (shutil.move(b / "draft" / "weights.bin", o), str(
        o / "weights.bin"))[1:] + (True,)), "is an absolute path"),
    ("external data: '..' location", _relocate(lambda b, o: ("../../outside/weights.bin", True)), "contains '..'"),
    ("external data: symlink out of the bundle", _relocate(_escape_by_symlink), "resolves through a symlink"),
    ("external data: file not listed in the manifest", _relocate(lambda b, o: ("weights.bin", False)),
     "does not list"),
]


@pytest.mark.parametrize("case, corrupt, message", EXTERNAL_CASES, ids=[c[0] for c in EXTERNAL_CASES])
def test_external_data_cannot_leave_the_bundle(external_bundle, tmp_path, case, corrupt, message):
    bundle = shutil.copytree(external_bundle, tmp_path / "bundle", symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    corrupt(bundle, outside)
    before = snapshot(bundle, outside)
    for verify in (True, False):  # refused even without the sha256 check
        with opened() as files:
            with pytest.raises(BundleError, match=message) as err:
                load_bundle(bundle, verify=verify)
        assert not [f for f in files if Path(f).is_relative_to(outside.resolve())], files
    line = cli_error(CliRunner().invoke(main, ["inspect", str(bundle)]), 1)
    assert message in line
    assert snapshot(bundle, outside) == before
    record(case, f"BundleError at load before ONNX Runtime reads it: '{message}'", one_line(str(err.value)))


# --- the CLI ----------------------------------------------------------------------------------------------------------

BAD_PROFILE = {
    "not TOML": ("name = 'x'\n[power\n", "is not valid TOML"),
    "budget_w = inf": ("[[power.modes]]\nname = \"max\"\nbudget_w = inf\n", "must be a finite number"),
    "idle_w = nan": (None, "must be a finite number"),
    "unknown key": ("[power.extra]\nfoo = 1\n", "unknown key"),
}


def _profile(tmp_path: Path, kind: str) -> Path:
    from mjsd.runtime.profiles import bundled_profiles

    text = bundled_profiles()["generic-cpu"].read_text()
    extra, _ = BAD_PROFILE[kind]
    if kind == "idle_w = nan":
        text = text.replace("idle_w = 10.0", "idle_w = nan")
    elif kind == "not TOML":
        text = extra
    else:
        text += extra
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


# (case, args, stdin, exit code, expected text); BUNDLE/PROFILE are filled in by the test
CLI_CASES = [
    ("--temperature inf", ["generate", "x", "--temperature", "inf"], None, 2, "is not a finite number"),
    ("--temperature nan", ["generate", "x", "--temp", "nan"], None, 2, "is not a finite number"),
    ("--top-p nan", ["generate", "x", "--top-p", "nan"], None, 2, "is not a finite number"),
    ("--tau inf", ["generate", "x", "--tau", "inf"], None, 2, "is not a finite number"),
    ("--power-budget inf", ["generate", "x", "--power-budget", "inf"], None, 2, "is not a finite number"),
    ("--power-budget -5", ["generate", "x", "--power-budget", "-5", "--bundle", "BUNDLE"], None, 1,
     "finite number of watts > 0"),
    ("--temperature -1", ["generate", "x", "--temperature", "-1", "--bundle", "BUNDLE"], None, 1, "temperature=-1.0"),
    ("-n 0", ["generate", "x", "-n", "0", "--bundle", "BUNDLE"], None, 1, "max_new_tokens=0"),
    ("--gamma 0", ["generate", "x", "--gamma", "0", "--bundle", "BUNDLE"], None, 1, "gamma=0"),
    ("--k-config 2,x", ["generate", "x", "--k-config", "2,x"], None, 2, "comma-separated list of integers"),
    ("--algo nope", ["generate", "x", "--algo", "nope"], None, 2, "'nope' is not one of"),
    ("unknown option", ["generate", "x", "--beams", "3"], None, 2, "No such option"),
    ("unknown command", ["frobnicate"], None, 2, "No such command"),
    ("invalid UTF-8 on stdin", ["generate", "--bundle", "BUNDLE"], b"ok \xff\xfe", 1, "is not valid UTF-8 (byte 0xff"),
    ("invalid UTF-8 in --file", ["generate", "--file", "BADFILE", "--bundle", "BUNDLE"], None, 1,
     "is not valid UTF-8"),
    ("surrogate-escaped prompt argument", ["generate", "a \udcff", "--bundle", "BUNDLE"], None, 1,
     "not valid UTF-8 (undecodable byte 0xff"),
    ("--file missing", ["generate", "--file", "/nonexistent/p.txt"], None, 1, "cannot read the prompt file"),
    ("empty stdin", ["generate", "-", "--bundle", "BUNDLE"], b"", 1, "the prompt is empty"),
    ("prompt + -n beyond the context", ["generate", "a " * 300, "-n", "4", "--bundle", "BUNDLE", "--algo", "ar"], None,
     1, "shorten the prompt to at most"),
    ("--bundle missing", ["generate", "x", "--bundle", "/nonexistent/bundle"], None, 1, "does not exist"),
    ("inspect a file", ["inspect", "BADFILE"], None, 1, "is a file"),
    ("--profile: not TOML", ["generate", "x", "--bundle", "BUNDLE", "--profile", "PROFILE:not TOML"], None, 1,
     "is not valid TOML"),
    ("--profile: budget_w = inf", ["profiles", "PROFILE:budget_w = inf"], None, 1, "must be a finite number"),
    ("--profile: idle_w = nan", ["generate", "x", "--bundle", "BUNDLE", "--profile", "PROFILE:idle_w = nan"], None, 1,
     "must be a finite number"),
    ("--profile: unknown key", ["profiles", "PROFILE:unknown key"], None, 1, "unknown key"),
    ("--profile: unknown name", ["generate", "x", "--profile", "no-such-board"], None, 1, "unknown profile"),
    ("bench --temperatures inf", ["bench", "--temperatures", "0,inf", "--bundle", "BUNDLE"], None, 1,
     "must be comma-separated finite numbers"),
    ("profile --budgets inf", ["profile", "--budgets", "inf", "--out", "runs/x"], None, 2, "not a finite number"),
    ("profile --taus nan", ["profile", "--taus", "nan", "--out", "runs/x"], None, 2, "not a finite number"),
    ("report of a folder that is no run", ["report", "."], None, 1, "is not a profile run directory"),
    ("profile --resume of a missing folder", ["profile", "--resume", "/nonexistent/run"], None, 1,
     "is not a profile run directory"),
    ("profile --algos unknown", ["profile", "--algos", "ar,nope", "--out", "runs/x"], None, 1, "algo='nope' is invalid"),
    ("--threads -1", ["generate", "x", "--threads", "-1"], None, 2, "is not in the range x>=1"),
    ("export over a folder that is no bundle", ["export", "--target", "t", "--draft", "d", "--out", "occupied"], None,
     1, "is not an mjsd bundle; refusing to overwrite it"),
]


@pytest.mark.parametrize("case, args, stdin, code, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line(tiny_vocab_bundle, tmp_path, monkeypatch, case, args, stdin, code, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("keep me")
    (tmp_path / "bad.txt").write_bytes(b"def f(\xe9):")

    def fill(a: str) -> str:
        if a.startswith("PROFILE:"):
            return str(_profile(tmp_path, a.split(":", 1)[1]))
        return {"BUNDLE": str(tiny_vocab_bundle), "BADFILE": str(tmp_path / "bad.txt")}.get(a, a)

    args = [fill(a) for a in args]
    before = snapshot(tmp_path, tiny_vocab_bundle)
    res = CliRunner().invoke(main, args, input=stdin if stdin is not None else "")
    line = cli_error(res, code)
    assert message in line, line
    assert snapshot(tmp_path, tiny_vocab_bundle) == before  # nothing written, nothing lost
    record(f"CLI: {case}", f"exit {code}, one line: '{message}'", line)


def test_estimated_energy_is_labelled_once(tiny_vocab_bundle):
    power = CliRunner().invoke(main, ["power", "--duration", "0.3", "--meter", "estimate"])
    gen = CliRunner().invoke(main, ["generate", "a b", "--bundle", str(tiny_vocab_bundle), "-n", "3", "--stats",
                                    "--meter", "estimate"])
    lines = [ln for ln in (power.output + gen.output).splitlines() if "ESTIMATED" in ln]
    assert power.exit_code == gen.exit_code == 0 and len(lines) == 2, lines
    assert all(ln.count("ESTIMATED") == 1 and "source estimate" not in ln for ln in lines), lines
    record("stats: estimated energy", "labelled once (no 'source estimated ESTIMATED')", lines[-1].strip())


def test_plain_mjsd_shows_the_help_not_an_error():
    res = CliRunner().invoke(main, [], prog_name="mjsd")
    assert "Usage: mjsd" in res.output and "error:" not in res.output and "Traceback" not in res.output


def test_stop_processes_escapes_like_llama_cpp(tiny_vocab_bundle):
    from mjsd.runtime.cli import unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb\\c\x41\"") == 'a\tb\\cA"' and unescape("\\q") == "\\q"
    res = CliRunner().invoke(main, ["generate", "a b", "--bundle", str(tiny_vocab_bundle), "--stop", r"\n", "-n", "8",
                                    "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["stats"]["finish_reason"] in ("length", "eos", "stop")
    record("CLI: --stop \"\\n\\n\"", "escapes processed (newline)", repr(unescape(r"\n\n")))


def test_invalid_utf8_argv_and_ctrl_c_in_a_real_process(tiny_vocab_bundle):
    """argv bytes reach Python as surrogates; Ctrl-C exits 130 and still prints --stats."""
    exe = [sys.executable, "-c", "from mjsd.runtime.cli import main; main()"]
    p = subprocess.run([*exe, "generate", b"def \xff(x):", "--bundle", str(tiny_vocab_bundle)], capture_output=True,
                       timeout=120)
    line = one_line(p.stderr.decode())
    assert p.returncode == 1 and "not valid UTF-8" in line, line
    record("CLI (process): invalid UTF-8 argument", "exit 1, one line", line)

    # SIGINT back to its default in the child: a test run started in the background by a non-interactive shell
    # ignores it, and the child would inherit that (and rightly keep generating)
    p = subprocess.Popen([*exe, "generate", "def f(x):", "-n", "500", "--ignore-eos", "--algo", "ar", "--stats",
                          "--meter", "estimate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.read(1)  # the built-in bundle is generating
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    err = err.decode()
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "(interrupted)" in err and "tokens/s" in err and err.strip().splitlines()[-1] == "error: interrupted"
    record("CLI (process): Ctrl-C during generate --stats", "exit 130, stats printed, 'error: interrupted'",
           f"exit {p.returncode}; " + err.strip().splitlines()[0])


def test_cli_and_engine_defaults_are_generation_configs(engine):
    """One source of truth: `mjsd generate`'s defaults and Engine.generate's are GenerationConfig()'s (algo mtad)."""
    from mjsd.runtime.cli import generate_cmd

    defaults = generate_cmd.make_context("generate", ["x"]).params  # what a run without options gets
    cfg = GenerationConfig()
    shared = [k for k in cfg.to_dict() if k in defaults and k != "k_config"]  # --k-config: None = the config's
    assert len(shared) >= 10 and {k: defaults[k] for k in shared} == {k: getattr(cfg, k) for k in shared}
    assert engine.config() == cfg.resolved() and cfg.algo == "mtad" and cfg.gamma is None  # auto: resolved per run
    assert engine.config().gamma == 24 and engine.config(temperature=1.0).gamma == 16
    assert engine.config(algo="sps").gamma == 16 and engine.config(gamma=5).gamma == 5
    record("defaults: GenerationConfig() vs CLI vs Engine", "identical, algo mtad", f"{len(shared)} shared fields equal")


# --- the Python API ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_vocab_bundle):
    return Engine.from_bundle(tiny_vocab_bundle, meter=None)


API_CASES = [
    ("prompt as bytes", lambda e: e.generate(b"a b"), "the prompt is bytes"),
    ("prompt as floats", lambda e: e.generate([1.0, 5.0]), "is not an integer"),
    ("prompt with a bool", lambda e: e.generate([True, 5]), "is not an integer"),
    ("prompt id outside the vocabulary", lambda e: e.generate([1, 10**9]), "must lie in 0..11"),
    ("negative prompt id", lambda e: e.generate([-1]), "must lie in 0.."),
    ("empty id list", lambda e: e.generate([]), "the prompt is empty"),
    ("prompt None", lambda e: e.generate(None), "must be a str or a list of int"),
    ("prompt with a lone surrogate", lambda e: e.generate("a \udcff"), "not valid UTF-8"),
    ("temperature=inf", lambda e: e.generate("a", temperature=math.inf), "temperature=inf"),
    ("top_p=nan", lambda e: e.generate("a", top_p=math.nan), "top_p=nan"),
    ("tau=inf", lambda e: e.generate("a", tau=math.inf), "tau=inf"),
    ("max_new_tokens=2.0", lambda e: e.generate("a", max_new_tokens=2.0), "max_new_tokens=2.0"),
    ("stop=5", lambda e: e.generate("a", stop=5), "stop=5"),
    ("config not a GenerationConfig", lambda e: e.generate("a", {"temperature": 1}), "must be a GenerationConfig"),
    ("unknown parameter", lambda e: e.generate("a", beams=2), "unknown generation parameter"),
    ("power_budget=inf", lambda e: Engine.from_bundle(e.bundle.root, power_budget=math.inf), "power_budget=inf"),
    ("power_budget=nan", lambda e: Engine.from_bundle(e.bundle.root, power_budget=math.nan), "power_budget=nan"),
    ("context overflow", lambda e: e.generate("a " * 300, algo="ar"), "shorten the prompt to at most"),
]


@pytest.mark.parametrize("case, call, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_one_mjsd_error(engine, case, call, message):
    with pytest.raises(MjsdError) as err:
        call(engine)
    line = one_line(str(err.value))
    assert message in line, line
    record(f"API: {case}", f"{type(err.value).__name__}: '{message}'", line)


def test_an_abandoned_stream_holds_no_one_up(engine):
    """A client that started a stream and went away (never iterated further, never closed): other threads'
    generations still run, and give what they give alone."""
    import threading
    import time

    alone = engine.generate("a b c", algo="sps", max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=7).tokens
    abandoned = engine.stream("a b", algo="mtad", max_new_tokens=40, ignore_eos=True)
    next(iter(abandoned))
    got, t0 = [], time.perf_counter()
    t = threading.Thread(target=lambda: got.append(engine.generate("a b c", algo="sps", max_new_tokens=6,
                                                                   ignore_eos=True, temperature=1.0, seed=7).tokens))
    t.start()
    t.join(timeout=30)
    seconds = time.perf_counter() - t0
    assert not t.is_alive() and got == [alone] and engine.turns.waiting == 0
    del abandoned
    record("API: a started, never-consumed stream", "other threads' generations run, same tokens as alone",
           f"other generation done in {seconds * 1e3:.0f} ms, tokens identical")


# --- export install: --out never loses a good bundle ------------------------------------------------------------------

def _fake_bundle(path: Path, tag: str) -> Path:
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"tag": tag}))
    return path


def _tag(path: Path) -> str:
    return json.loads((path / MANIFEST).read_text())["tag"]


def test_install_rolls_back_when_the_new_bundle_cannot_be_moved_in(tmp_path):
    from mjsd.export.pipeline import _install

    out = _fake_bundle(tmp_path / "bundle", "old")
    with pytest.raises(FileNotFoundError):
        _install(tmp_path / "vanished-tmp", out)  # a real failure of the second rename
    assert _tag(out) == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    record("export: install fails after the old bundle moved aside", "old bundle put back, no leftovers",
           f"--out holds '{_tag(out)}'")


def test_install_interrupted_between_the_renames_puts_the_old_bundle_back(tmp_path, monkeypatch):
    """Ctrl-C is held during the swap; should anything still raise between the renames (here: KeyboardInterrupt
    injected into the second rename), the old bundle goes back."""
    from mjsd.export import pipeline

    out = _fake_bundle(tmp_path / "bundle", "old")
    new = _fake_bundle(tmp_path / ".bundle.tmp-1-x", "new")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(pipeline.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        pipeline._install(new, out)
    monkeypatch.setattr(pipeline.os, "replace", real)
    assert _tag(out) == "old" and _tag(new) == "new" and not list(tmp_path.glob(".bundle.old-*"))
    record("export: interrupt between the two renames", "old bundle put back", f"--out holds '{_tag(out)}'")
    pipeline._install(new, out)  # and the swap itself works
    assert _tag(out) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_stale_work_directories_are_cleaned_and_a_lost_bundle_restored(tmp_path):
    from mjsd.export.pipeline import STALE_S, clean_stale

    dead = 2**22 + 12345  # above Linux's pid_max: no such process
    out = tmp_path / "bundle"
    old = tmp_path / f".bundle.old-{dead}-abc"
    _fake_bundle(old / "bundle", "previous")  # killed between the renames: --out missing
    (tmp_path / f".bundle.tmp-{dead}-def").mkdir()  # killed while building
    live = tmp_path / f".bundle.tmp-{os.getpid()}-ghi"  # an export running now
    live.mkdir()
    aged = tmp_path / ".bundle.tmp-xyz"  # an older mjsd's name, no pid, two days old
    aged.mkdir()
    os.utime(aged, (0, os.path.getmtime(aged) - 2 * STALE_S))
    fresh = tmp_path / ".bundle.tmp-uvw"  # no pid, recent: perhaps running, kept
    fresh.mkdir()
    other = tmp_path / f".other.tmp-{dead}-jkl"  # another --out's: not ours to touch
    other.mkdir()
    done = clean_stale(out)
    assert _tag(out) == "previous" and any("restored" in line for line in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", live.name, fresh.name, other.name])
    record("export: stale .tmp-/.old- dirs of killed runs", "dead-pid or >1 day old removed; lost bundle restored",
           "; ".join(done))


# --- property tests ---------------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
FIELDS = [f for f in GenerationConfig.__dataclass_fields__]
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=4), st.lists(st.integers(-1, 4), max_size=3), st.binary(max_size=3))


@hypothesis.settings(max_examples=400, deadline=None, database=None, derandomize=True)
@hypothesis.given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=4))
def test_generation_config_accepts_only_valid_values(kwargs):
    """Any values: either a valid config (finite numbers, normalised, round-trips) or one ConfigError line naming a
    field that was given; never another exception."""
    try:
        cfg = GenerationConfig(**kwargs)
    except ConfigError as e:
        msg = one_line(str(e))
        assert any(msg.startswith(f"{k}=") for k in kwargs), msg
        return
    for k, v in cfg.to_dict().items():
        assert not isinstance(v, float) or math.isfinite(v), (k, v)
    assert GenerationConfig(**cfg.to_dict()) == cfg and cfg.lookahead >= 0 and hash(cfg) == hash(cfg)


VALID = dict(algo=st.sampled_from(["ar", "sps", "mjsd", "mtad", "mmtad", "mcsd", "mjgd"]),
             max_new_tokens=st.integers(1, 6), temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
             top_k=st.integers(0, 5), top_p=st.floats(0.05, 1.0), seed=st.integers(0, 2**32),
             gamma=st.integers(1, 2), beam_width=st.integers(1, 3),  # mjgd scores vocab**gamma paths per round tau=st.floats(0.01, 1.0),
             k_config=st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple), ignore_eos=st.booleans())


@hypothesis.settings(max_examples=30, deadline=None, database=None, derandomize=True)
@hypothesis.given(st.fixed_dictionaries({}, optional=VALID), st.lists(st.integers(0, 11), min_size=1, max_size=8))
def test_random_valid_configs_generate_or_refuse_cleanly(engine, params, prompt):
    """Random valid configurations on a real engine: tokens in the vocabulary, or an MjsdError (e.g. a tree
    algorithm on a bundle without tree attention), never another exception."""
    try:
        r = engine.generate(prompt, **params)
    except MjsdError as e:
        one_line(str(e))
        return
    assert 1 <= len(r.tokens) <= params.get("max_new_tokens", GenerationConfig.max_new_tokens)
    assert all(0 <= t < engine.bundle.vocab_size for t in r.tokens)
