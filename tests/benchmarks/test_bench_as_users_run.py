"""The benchmarks as users run them: the triton provider of the ASPP benchmark, reruns into a folder that holds an
earlier run's results, runs that stop before the end, and gpu_suite.sh started from another folder."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT

BENCH_DIR = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402

QUICK = ["--device", "cpu", "--quick", "--threads", "1"]


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---- aspp_bench: the triton provider ----------------------------------------------------------------------------


def test_aspp_bench_asks_the_triton_backend_with_the_calls_channels(tmp_path, monkeypatch):
    """aspp_bench asked deeplab_ops whether triton can run its case without the ASPP's channel count, which the
    triton rule needs (its int32 check): `--providers triton` stopped the whole run with "TypeError: _triton_aspp()
    missing 1 required keyword-only argument: 'channels'" wherever that rule is consulted: under the interpreter on
    CPU, and on every GPU (the suite's aspp_goal phase). With the count, the case runs (or, here with a spent
    budget, is recorded as skipped)."""
    import aspp_bench

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    argv = [*QUICK, "--out", str(tmp_path), "--providers", "triton,triton-cl", "--modes", "eval_fwd",
            "--budget-s", "0"]
    assert aspp_bench.main(argv) == 1  # nothing ran: the budget of 0 s records every case as skipped
    rows = json.loads((tmp_path / "aspp_bench.json").read_text())["rows"]
    assert [(r["provider"], r["status"]) for r in rows] == [("triton", "skipped"), ("triton-cl", "skipped")]
    assert all(r["note"] == "time budget of 0 s spent" for r in rows), rows


def test_aspp_bench_passes_the_channels_the_module_has(tmp_path, monkeypatch):
    """The availability question carries the module's own C_out (--out-channels), the number the triton rule sizes
    the branch buffers with."""
    import aspp_bench

    from deeplab_ops import backends

    seen = []
    original = backends.not_supported_reasons

    def spy(backend, op, device, **call):
        seen.append((backend, op, call.get("channels"), call["x"].shape[1]))
        return original(backend, op, device, **call)

    monkeypatch.setattr(backends, "not_supported_reasons", spy)
    argv = [*QUICK, "--out", str(tmp_path), "--providers", "cpu", "--modes", "eval_fwd", "--in-channels", "6",
            "--out-channels", "5", "--budget-s", "0"]
    aspp_bench.main(argv)
    assert seen == [("cpu", "aspp", 5, 6)]


def test_aspp_bench_runs_max_autotune_after_every_other_row(tmp_path):
    """compile-max's setup took 47-71 s per mode on the H200 and spent the suite's ASPP budget before any fwd_bwd
    row ran: its rows come after all the other providers' rows of every mode."""
    import aspp_bench

    argv = [*QUICK, "--out", str(tmp_path), "--providers", "compile-max,eager,cpu", "--modes",
            "train_fwd,eval_fwd,fwd_bwd", "--budget-s", "0"]
    aspp_bench.main(argv)
    rows = json.loads((tmp_path / "aspp_bench.json").read_text())["rows"]
    order = [(r["provider"], r["mode"]) for r in rows]
    assert order == [(p, m) for m in ("train_fwd", "eval_fwd", "fwd_bwd") for p in ("eager", "cpu")] + [
        ("compile-max", m) for m in ("train_fwd", "eval_fwd", "fwd_bwd")], order


# ---- reruns: an earlier run's results are moved aside, never overwritten ----------------------------------------


def test_a_rerun_keeps_the_earlier_runs_results(tmp_path, capsys):
    """A second run with the same --out and --name overwrote NAME.json and NAME.csv at its first case (a rerun
    stopped after one case left one row where a whole run had been), kept an earlier NAME.png beside rows it does
    not show, and appended its profiles to the earlier run's NAME_profile.txt. The earlier files are now moved to
    NAME.prev-<time>.EXT, and the run says so."""
    import conv_bn_relu_bench

    for ext in common.RESULT_SUFFIXES:
        (tmp_path / f"cbr{ext}").write_text(f"earlier {ext}\n")
    argv = [*QUICK, "--out", str(tmp_path), "--name", "cbr", "--providers", "eager", "--modes", "eval_fwd",
            "--budget-s", "0"]
    conv_bn_relu_bench.main(argv)
    assert "kept the earlier run's results: cbr.json -> cbr.prev-" in capsys.readouterr().out
    for ext in common.RESULT_SUFFIXES:
        kept = list(tmp_path.glob(f"cbr.prev-*{ext}" if ext[0] == "." else "cbr_profile.prev-*.txt"))
        assert len(kept) == 1 and kept[0].read_text() == f"earlier {ext}\n", (ext, sorted(tmp_path.iterdir()))
    assert not (tmp_path / "cbr.png").exists() and not (tmp_path / "cbr_profile.txt").exists()
    assert json.loads((tmp_path / "cbr.json").read_text())["meta"]["script"] == "conv_bn_relu_bench"
    # a third run keeps the second's too: nothing is replaced
    conv_bn_relu_bench.main(argv)
    assert len(list(tmp_path.glob("cbr.prev-*.json"))) == 2


def test_a_rerun_of_overhead_bench_keeps_the_earlier_runs_results(tmp_path):
    import overhead_bench

    for ext in (".csv", ".md"):
        (tmp_path / f"oh{ext}").write_text(f"earlier {ext}\n")
    overhead_bench.main(["--device", "cpu", "--quick", "--ops", "upsample_cross_entropy", "--modes", "eval_fwd",
                         "--backends", "cpu", "--out", str(tmp_path), "--name", "oh", "--budget-s", "0"])
    for ext in (".csv", ".md"):
        kept = list(tmp_path.glob(f"oh.prev-*{ext}"))
        assert len(kept) == 1 and kept[0].read_text() == f"earlier {ext}\n", sorted(tmp_path.iterdir())
    assert (tmp_path / "oh.csv").read_text().startswith("op,provider,")


# ---- runs that stop before the end ------------------------------------------------------------------------------


def _row(**fields) -> dict:
    case = dict(op="aspp", provider="eager", mode="eval_fwd", dtype="fp32", shape="32x9x9 r2/4/6 ->16", batch=2,
                status="ok", median_ms=1.0)
    return common.make_row(dict.fromkeys(common.ENV_FIELDS, "x"), **{**case, **fields})


def test_a_results_csv_cut_off_or_edited_is_refused_naming_its_line(tmp_path, capsys):
    """A CSV whose header or a row was cut mid-line (a copy that stopped, a hand edit) was read without complaint:
    the row's fields shifted under other columns, or the missing ones read as empty."""
    whole = tmp_path / "whole.csv"
    common.write_results([_row(), _row(provider="cpu")], tmp_path, "whole")
    lines = whole.read_text().splitlines()
    header_cut = tmp_path / "header_cut.csv"
    header_cut.write_text(lines[0].rsplit(",", 3)[0] + "\n" + "\n".join(lines[1:]) + "\n")
    row_cut = tmp_path / "row_cut.csv"
    row_cut.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2] + "\n")
    fields = len(common.FIELDS)
    for path, line, given, header in [(header_cut, 2, fields, fields - 3), (row_cut, 3, None, fields)]:
        with pytest.raises(ValueError) as e:
            common.read_rows(path)
        message = str(e.value)
        assert message.startswith(f"{path}: line {line} has "), message
        assert f"fields, the header {header} (a file cut off or edited by hand?" in message
        if given is not None:
            assert f"has {given} fields" in message
        assert common.main(["roofline", str(path)]) == 1
        assert capsys.readouterr().err.startswith(f"benchmarks/common.py roofline: {path}: line {line} has ")
    assert len(common.read_rows(whole)) == 2


def test_the_csv_of_an_unfinished_run_says_so(tmp_path):
    """The JSON of a run still going (or killed) says "partial" in its meta; its CSV looked exactly like a finished
    run's. Its last row now has status partial and a note saying so; a finished run's CSV has no such row."""
    common.write_results([_row()], tmp_path, "run", {"partial": True})
    rows = _csv_rows(tmp_path / "run.csv")
    assert [r["status"] for r in rows] == ["ok", "partial"]
    assert rows[-1]["note"] == common.PARTIAL_NOTE and rows[-1]["op"] == ""
    # the readers of results files skip it: the roofline and the goals read ok rows only
    assert len(common.roofline_report(tmp_path / "run.csv")) == 2  # its header and the ok row
    common.write_results([_row()], tmp_path, "run", {"script": "aspp_bench"})
    assert [r["status"] for r in _csv_rows(tmp_path / "run.csv")] == ["ok"]


def test_overhead_bench_files_of_an_unfinished_run_say_so(tmp_path):
    import overhead_bench

    row = dict.fromkeys(overhead_bench.FIELDS)
    row.update(op="aspp", provider="cpu", mode="eval_fwd", status="ok")
    overhead_bench.write_csv([row], tmp_path / "o.csv", partial=True)
    assert [r["status"] for r in _csv_rows(tmp_path / "o.csv")] == ["ok", "partial"]
    overhead_bench.write_csv([row], tmp_path / "o.csv")
    assert [r["status"] for r in _csv_rows(tmp_path / "o.csv")] == ["ok"]


def test_overhead_bench_markdown_of_a_finished_run_is_not_marked_partial(tmp_path):
    import overhead_bench

    overhead_bench.main(["--device", "cpu", "--quick", "--ops", "upsample_cross_entropy", "--modes", "eval_fwd",
                         "--backends", "cpu", "--out", str(tmp_path), "--name", "oh", "--budget-s", "0"])
    assert overhead_bench.PARTIAL_MD not in (tmp_path / "oh.md").read_text()
    assert "partial" not in {r["status"] for r in _csv_rows(tmp_path / "oh.csv")}


class _Interrupting(int):
    """A value JSON writes as a number and the CSV writer turns into text by str(): Ctrl-C arrives there."""

    def __str__(self) -> str:
        raise KeyboardInterrupt


def test_a_write_interrupted_half_way_leaves_the_previous_file_whole(tmp_path):
    """The CSV was truncated and then written row by row: Ctrl-C (or gpu_suite's SIGINT) in between left a file
    holding the header and some rows, which looked like a smaller finished run. Each file is now written aside and
    replaces the previous one in one step."""
    common.write_results([_row(), _row(provider="cpu"), _row(provider="cpu-cl")], tmp_path, "run")
    before = (tmp_path / "run.csv").read_text()
    with pytest.raises(KeyboardInterrupt):
        common.write_results([_row(median_ms=2.0), _row(provider="cpu", batch=_Interrupting(2))], tmp_path, "run")
    assert (tmp_path / "run.csv").read_text() == before
    assert len(_csv_rows(tmp_path / "run.csv")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.json"]  # no temporary file left


def test_ctrl_c_is_one_line_and_exit_status_130(capsys, tmp_path):
    """The line says what was kept: the cases finished so far where a results file was written, and that none was
    where the run stopped before its first save (it said that the files keep the cases, and there were none)."""
    def main():
        raise KeyboardInterrupt

    assert common.run_script(main, "aspp_bench.py") == 130
    err = capsys.readouterr().err
    assert "aspp_bench.py: interrupted: before any case finished; no results file was written" in err
    assert "Traceback" not in err

    def main_after_a_save():
        common.claim_results(tmp_path, "run")
        common.write_results([_row()], tmp_path, "run", {"partial": True})
        raise KeyboardInterrupt

    assert common.run_script(main_after_a_save, "aspp_bench.py") == 130
    err = capsys.readouterr().err
    assert "aspp_bench.py: interrupted: the results files keep the cases finished so far, marked partial" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.json"]  # the claim's lock file removed


def test_a_second_run_of_the_same_name_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two runs with one --out and --name at once: the second moved the first's files aside, then each replaced the
    other's files on every save, and the first run's rows were lost without a word. The second is now refused
    before it moves or writes anything; once the first has finished, the name is free again."""
    common.claim_results(tmp_path, "run")
    try:
        _second_run_refused(tmp_path)
    finally:
        common.release_results()
    assert not (tmp_path / ".run.lock").exists()


def _second_run_refused(tmp_path):
    common.write_results([_row()], tmp_path, "run")
    before = {p.name: p.read_text() for p in tmp_path.iterdir() if not p.name.startswith(".")}
    code = (f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import common\n"
            f"def main():\n    common.claim_results({str(tmp_path)!r}, 'run')\n"
            f"    common.set_aside_earlier_results({str(tmp_path)!r}, ['run.json', 'run.csv'])\n    return 0\n"
            "sys.exit(common.run_script(main, 'aspp_bench.py'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"aspp_bench.py: another run is writing the results named 'run' in {tmp_path} (it holds "
                             ".run.lock): wait for it to finish, or give this one another --name or --out\n")
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if not p.name.startswith(".")} == before
    common.release_results()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.json"]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "kept the earlier run's results" in result.stdout, result.stderr


def test_a_claim_where_nothing_can_be_locked_still_knows_its_files(tmp_path, monkeypatch, capsys):
    """Without fcntl (Windows) the claim recorded nothing, and an interrupt after a save said that no results file
    was written."""
    monkeypatch.setitem(sys.modules, "fcntl", None)

    def main():
        common.claim_results(tmp_path, "run")
        common.write_results([_row()], tmp_path, "run", {"partial": True})
        raise KeyboardInterrupt

    assert common.run_script(main, "aspp_bench.py") == 130
    assert "interrupted: the results files keep the cases finished so far" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.json"] and not common._CLAIMS


def test_a_results_file_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    """A full disk (or a folder made read-only) while a results file was written: a traceback ending in OSError.
    One line naming the file; the file keeps what it held (each is replaced in one step)."""
    import errno

    common.write_results([_row()], tmp_path, "run")
    before = (tmp_path / "run.json").read_text()
    common.claim_results(tmp_path, "run")

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(common, "write_text_atomic", full)
    assert common.run_script(lambda: common.write_results([_row(), _row()], tmp_path, "run"), "aspp_bench.py") == 1
    err = capsys.readouterr().err
    assert err == (f"aspp_bench.py: No space left on device ({tmp_path / 'run.json'}); the results files keep what "
                   "they held before this write\n")
    assert (tmp_path / "run.json").read_text() == before


def test_run_script_leaves_sigterm_as_it_found_it():
    # its handler stayed installed after it returned where the one before was not set from Python (None)
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert common.run_script(lambda: 0, "aspp_bench.py") == 0
    assert signal.getsignal(signal.SIGTERM) == (signal.SIG_DFL if before is None else before)


def test_sigterm_is_the_same_line_and_exit_status_143(tmp_path):
    """SIGTERM (kill, `timeout`) ended a script silently with status 143 (its files kept, marked partial, unsaid)."""
    code = (f"import os, signal, sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import common\n"
            "def main():\n    os.kill(os.getpid(), signal.SIGTERM)\n    raise AssertionError('not stopped')\n"
            "sys.exit(common.run_script(main, 'train_bench.py'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 143, result.stderr
    assert "train_bench.py: terminated (SIGTERM): before any case finished; no results file was written" in \
        result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("script", ["aspp_bench", "conv_bn_relu_bench", "train_bench", "overhead_bench"])
def test_ctrl_c_in_a_script_as_a_command(script, tmp_path):
    """A SIGINT while the script runs (here: at once, from the first line of its main) ends it with the line and
    status 130, as Ctrl-C or the timeout of a gpu_suite.sh phase does."""
    code = (f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import runpy, {script}\n"
            f"def stop(*a, **k):\n    raise KeyboardInterrupt\n"
            f"import argparse; argparse.ArgumentParser.parse_args = stop\n"
            f"sys.argv = [{script + '.py'!r}]\n"
            f"runpy.run_path({str(BENCH_DIR / (script + '.py'))!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 130, result.stderr
    assert f"{script}.py: interrupted" in result.stderr and "Traceback" not in result.stderr


# ---- overhead_bench: the commit --------------------------------------------------------------------------------


def test_overhead_bench_git_commit_follows_the_one_rule(monkeypatch):
    """overhead_bench took $GIT_COMMIT as it was, so GIT_COMMIT=' ' named the rows ' ' where the other scripts (and
    gpu_suite.sh) fall back to the repository's HEAD for a blank value."""
    import overhead_bench

    monkeypatch.setenv("GIT_COMMIT", "  ")
    cpu = torch.device("cpu")
    assert overhead_bench.environment(cpu)["git_commit"] == common.environment(cpu)["git_commit"] != "  "
    monkeypatch.setenv("GIT_COMMIT", " abc123 ")
    assert overhead_bench.environment(cpu)["git_commit"] == "abc123"


# ---- what a results file holds, and lists given twice ------------------------------------------------------------


def test_the_csv_holds_the_flop_count_in_full(tmp_path):
    """flops is a count (2 x the multiply-adds of the taps inside the image), kept as a float: the CSV wrote it with
    6 significant digits, so the quick ASPP row's 2784256 read 2.78426e+06 and a training step's 667342124 read
    6.67342e+08, not what an independent count gives."""
    common.write_results([_row(flops=2784256.0, min_bytes=97152, median_ms=0.5)], tmp_path, "run")
    row = _csv_rows(tmp_path / "run.csv")[0]
    assert (row["flops"], row["min_bytes"], row["median_ms"]) == ("2784256", "97152", "0.5")


@pytest.mark.parametrize("module, argv, message", [
    ("aspp_bench", ["--providers", "eager,cpu,eager"], "argument --providers: eager listed more than once"),
    ("conv_bn_relu_bench", ["--batches", "2,2"], "argument --batches: 2 listed more than once"),
    ("train_bench", ["--dtypes", "fp32,bf16,fp32"], "argument --dtypes: fp32 listed more than once"),
    ("overhead_bench", ["--ops", "aspp,aspp"], "argument --ops: aspp listed more than once"),
])
def test_a_list_item_given_twice_is_refused(module, argv, message, tmp_path, capsys):
    """--providers eager,cpu,eager ran eager twice in every case: two rows of one case, whose speedups and goal
    lines then took one of them. A usage error naming the flag, before anything runs."""
    import importlib

    script = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_info:
        script.main([*QUICK[:2], "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_bench_skips_triton_at_a_half_dtype_in_the_interpreter(tmp_path, monkeypatch):
    """train_bench asked the triton backend about a call on the meta device, where the interpreter's rule (bfloat16
    only on CUDA tensors) does not look: `TRITON_INTERPRET=1 train_bench.py --device cpu --providers triton
    --dtypes bf16` built the model and recorded an error row (RuntimeError from inside the first conv) where the
    other scripts record the case as skipped with that reason."""
    import train_bench

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    train_bench.main([*QUICK, "--out", str(tmp_path), "--providers", "triton,triton-lean", "--dtypes", "bf16",
                      "--modes", "eval_fwd"])
    rows = json.loads((tmp_path / "train_bench.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["skipped", "skipped"], rows
    assert all("the Triton interpreter stores bfloat16 as raw bits" in r["note"] for r in rows)


# ---- a new user's review, 2026-12-04 ---------------------------------------------------------------------------


def test_a_second_sigint_while_the_interruption_is_reported_is_ignored(capsys):
    # gpu_suite.sh's interrupt reaches a phase twice (its own kill to the process group, and timeout's): the second
    # one raised KeyboardInterrupt inside the report's print, a two-part traceback
    import os
    import signal

    def main():
        raise KeyboardInterrupt

    real_print = print

    def print_twice_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered now: ignored while the report is written
        real_print(*args, **kwargs)

    before = signal.getsignal(signal.SIGINT)
    import builtins
    builtins.print = print_twice_interrupted
    try:
        assert common.run_script(main, "aspp_bench.py") == 130
    finally:
        builtins.print = real_print
    assert "aspp_bench.py: interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # restored for whoever runs next in this process


def test_a_failed_row_makes_the_exit_status_1(tmp_path):
    # finish() returned 0 when any row ran: a run whose cpu rows all failed (a bad DEEPLAB_OPS_CPU_WINOGRAD) exited
    # 0, and gpu_suite.sh reported its phase ok
    import argparse
    args = argparse.Namespace(out=str(tmp_path), name="x", plot=False)
    ok = {"op": "aspp", "provider": "eager", "mode": "eval_fwd", "dtype": "fp32", "shape": "s", "batch": 2,
          "status": "ok", "median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0}
    failed = {**ok, "provider": "cpu", "status": "error", "median_ms": None, "note": "ValueError: ..."}
    skipped = {**ok, "provider": "triton", "status": "skipped", "median_ms": None, "note": "no interpreter"}
    assert common.finish([dict(ok), dict(skipped)], args, {}, "t") == 0
    assert common.finish([dict(ok), dict(failed)], args, {}, "t") == 1
    assert common.finish([dict(skipped)], args, {}, "t") == 1


@pytest.mark.parametrize("script", ["aspp_bench", "overhead_bench"])
def test_device_cuda_without_a_gpu_is_a_usage_error(script, tmp_path):
    # exit status 1 and a bare message, where docs/benchmarks.md promises a usage error naming the flag (exit 2)
    if torch.cuda.is_available():  # accepted where a GPU is visible (a run there is the GPU suite's)
        assert common.device_name("cuda") == "cuda"
        return
    result = subprocess.run([sys.executable, str(BENCH_DIR / f"{script}.py"), "--device", "cuda", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "error: argument --device: cuda: no CUDA device is visible here; use --device cpu" in result.stderr


# ---- a review of the scripts' edges: a reader that stops early, the meta of a run that stopped ------------------


def test_a_reader_of_stdout_that_stopped_ends_the_run_quietly(capsys):
    def main():
        raise BrokenPipeError

    assert common.run_script(main, "aspp_bench.py") == 1
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("script, argv", [
    ("aspp_bench", [*QUICK, "--providers", "cpu", "--modes", "eval_fwd", "--budget-s", "0"]),
    ("overhead_bench", [*QUICK, "--ops", "aspp", "--modes", "eval_fwd", "--backends", "cpu", "--budget-s", "0"]),
])
def test_stdout_piped_into_a_reader_that_stopped(script, argv, tmp_path):
    """`aspp_bench.py --device cpu --quick | head -1`: once head had its line, the script's next print raised
    BrokenPipeError, a traceback, and another one ("Exception ignored ... BrokenPipeError") as the interpreter
    exited. Now the run ends quietly with exit status 1. Here the reader is gone before the first line."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, str(BENCH_DIR / f"{script}.py"), *argv, "--out", str(tmp_path)],
                                stdout=write, stderr=subprocess.PIPE, text=True, timeout=300, cwd=tmp_path)
    finally:
        os.close(write)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr


@pytest.mark.parametrize("script", ["aspp_bench", "conv_bn_relu_bench", "train_bench"])
def test_a_partial_results_json_holds_the_runs_meta(script, tmp_path, monkeypatch):
    """A run stopped before its end (Ctrl-C, a phase's timeout) left a JSON whose meta was only {"partial": true}:
    no machine, versions, commit or command line to say whose rows they are. The meta is made before the first
    case, and every save during the run writes it with "partial": true."""
    import importlib

    module = importlib.import_module(script)
    argv = [*QUICK, "--out", str(tmp_path), "--modes", "eval_fwd", "--budget-s", "0"]

    def stopped(*args, **kwargs):  # the end of the run never comes: the files hold what the saves during it wrote
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(common, "finish", stopped)
        with pytest.raises(KeyboardInterrupt):
            module.main(argv)
    partial = json.loads((tmp_path / f"{script}.json").read_text())["meta"]
    assert module.main(argv) == 1  # the same run to its end (every case skipped: the budget of 0 s)
    full = json.loads((tmp_path / f"{script}.json").read_text())["meta"]
    assert partial["partial"] is True and "partial" not in full
    assert set(partial) == set(full) | {"partial"}
    assert partial["script"] == full["script"] == script and partial["argv"] == full["argv"] == argv
    assert partial["environment"]["device"] == "cpu" and partial["environment"]["torch"] == torch.__version__


def test_the_goals_say_which_file_is_a_partial_runs(tmp_path):
    """The goals read the files of a run that had not finished as a whole run's: "no fwd_bwd row ran in
    aspp_goal.json" where the run never reached fwd_bwd. A partial file (the JSON's meta, the CSV's last row) is
    named with "(partial run)"."""
    train = [_row(op="deeplabv3", mode="train_step", shape="s"), _row(op="deeplabv3", provider="cpu",
                                                                      mode="train_step", shape="s")]
    common.write_results([_row(mode="train_fwd"), _row(provider="cpu", mode="train_fwd")], tmp_path, "aspp_goal",
                         {"script": "aspp_bench", "partial": True})
    common.write_results(train, tmp_path, "train_bench", {"script": "train_bench", "partial": True})
    (tmp_path / "train_bench.json").unlink()  # its CSV says it with its last row
    lines = common.goal_report(tmp_path)
    assert lines[0] == (f"read: {tmp_path / 'aspp_goal.json'} (partial run), {tmp_path / 'train_bench.csv'} "
                        "(partial run)"), lines
    assert "ASPP forward + backward vs best eager: no fwd_bwd row ran in aspp_goal.json (partial run)" in lines
    assert any(line.startswith("training step vs best eager (images/s) [s, fp32, N2, x]: cpu ") for line in lines)
    common.write_results([_row(mode="train_fwd")], tmp_path, "aspp_goal", {"script": "aspp_bench"})
    common.write_results(train, tmp_path, "train_bench", {"script": "train_bench"})
    lines = common.goal_report(tmp_path)
    assert lines[0] == f"read: {tmp_path / 'aspp_goal.json'}, {tmp_path / 'train_bench.json'}"
    assert not any("partial" in line for line in lines), lines


# ---- a batch too large to allocate, quick GPU batches, the run's environment variables, the goals' fused rows -------


def _out_of_memory_at(batch: int, monkeypatch) -> None:
    """torch.randn raises what the CPU allocator raises for a tensor too large, where its first size is `batch`
    (the scripts' inputs; nothing else they draw starts with it): a batch too large, without allocating it."""
    real = torch.randn

    def randn(*size, **kwargs):
        if size and size[0] == batch:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 103680000000 bytes. Error code 12 (Cannot allocate "
                               "memory)")
        return real(*size, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)


@pytest.mark.parametrize("script", ["aspp_bench", "conv_bn_relu_bench"])
def test_a_batch_too_large_to_allocate_is_an_error_row_and_the_run_goes_on(script, tmp_path, monkeypatch):
    """`aspp_bench.py --device cpu --quick --batches 10000000` ended in a traceback and wrote nothing, and
    conv_bn_relu_bench's `--batches 2,10000000` left files marked partial: the input was made outside the case's
    error handling. A batch that cannot be allocated is now an error row per provider naming the out-of-memory, the
    batches after it run, and the files are a finished run's."""
    import importlib

    module = importlib.import_module(script)
    _out_of_memory_at(3, monkeypatch)
    argv = [*QUICK, "--out", str(tmp_path), "--batches", "3,2", "--modes", "eval_fwd", "--providers", "cpu,eager"]
    assert module.main(argv) == 1  # a row failed
    data = json.loads((tmp_path / f"{script}.json").read_text())
    rows = data["rows"]
    assert "partial" not in data["meta"] and _csv_rows(tmp_path / f"{script}.csv")[-1]["status"] != "partial"
    failed = [r for r in rows if r["batch"] == 3]
    assert failed and all(r["status"] == "error" and "can't allocate memory" in r["note"] for r in failed), failed
    assert {r["provider"] for r in failed} == {"cpu", "eager"}
    later = [r for r in rows if r["batch"] == 2]
    assert later and all(r["status"] == "ok" for r in later), [(r["provider"], r["note"]) for r in later]


def test_aspp_bench_quick_runs_a_batch_that_trains():
    """--quick kept the first default batch, [1, 8, 16][:1] = [1], and training modes skip batch 1 (the pooling
    branch's BatchNorm): a quick GPU run timed eval alone. It keeps the first default that trains: 8 on cuda, 2 on
    cpu as before; a batch given is kept."""
    import aspp_bench

    assert aspp_bench.select_batches(cuda=True, given=None, quick=True) == [8]
    assert aspp_bench.select_batches(cuda=False, given=None, quick=True) == [2]
    assert aspp_bench.select_batches(cuda=True, given=None, quick=False) == [1, 8, 16]
    assert aspp_bench.select_batches(cuda=True, given=[1], quick=True) == [1]
    assert aspp_bench.select_batches(cuda=False, given=[4, 1], quick=False) == [4, 1]


@pytest.mark.parametrize("script", ["aspp_bench", "conv_bn_relu_bench", "train_bench"])
def test_the_meta_records_the_environment_variables_that_change_a_run(script, tmp_path, monkeypatch):
    """overhead_bench put DEEPLAB_OPS_AUTOTUNE and TRITON_INTERPRET on its rerun line; the other scripts' results
    did not say under which of them (nor the cpu backend's Winograd route, nor glibc's malloc thresholds) they were
    measured. Their meta records each, null where unset."""
    import importlib

    module = importlib.import_module(script)
    monkeypatch.setenv("DEEPLAB_OPS_CPU_WINOGRAD", "0")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1073741824")
    monkeypatch.setenv("DEEPLAB_OPS_AUTOTUNE", "off")
    module.main([*QUICK, "--out", str(tmp_path), "--modes", "eval_fwd", "--budget-s", "0"])
    variables = json.loads((tmp_path / f"{script}.json").read_text())["meta"]["environment_variables"]
    assert variables == {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "DEEPLAB_OPS_AUTOTUNE": "off",
                         "DEEPLAB_OPS_CPU_WINOGRAD": "0", "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1073741824"}


def test_overhead_benchs_rerun_line_names_every_variable_set(tmp_path, monkeypatch):
    import overhead_bench

    monkeypatch.setenv("DEEPLAB_OPS_CPU_WINOGRAD", "0")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=33554432")
    argv = [*QUICK, "--ops", "aspp", "--backends", "cpu", "--budget-s", "0", "--out", str(tmp_path), "--name", "o"]
    overhead_bench.main(argv)
    md = (tmp_path / "o.md").read_text()
    assert "DEEPLAB_OPS_CPU_WINOGRAD=0 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432 python " in md, md
    assert "DEEPLAB_OPS_CPU_WINOGRAD=0, GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432." in md


def _step_rows(*providers_ms, gpu="test GPU", **extra) -> list[dict]:
    return [{"op": "deeplabv3", "provider": p, "mode": "train_step", "dtype": "bf16", "shape": "s", "batch": 16,
             "status": "ok", "median_ms": ms, "gpu": gpu, "peak_mem_mb": None, **extra} for p, ms in providers_ms]


def test_the_goals_compare_the_fastest_form_of_each_fused_backend(tmp_path):
    """The training-step goal looked at cuda, triton and cpu only: for the 2026-12-04 H200 run, whose one cuda row
    was cuda-lean, it said "no cuda / triton / cpu row to compare", and on a CPU smoke run the faster cpu-cl and
    cpu-lean rows were never compared. Each backend's fastest form (plain, -cl, -lean) is compared now, as the
    anchor is the fastest eager setup, and named; the -graph replays (no baseline replayed) are not."""
    title = "training step vs best eager (images/s) [s, bf16, N16, test GPU]"
    rows = _step_rows(("eager", 128.0), ("eager-amp", 72.0), ("cuda-lean", 48.6))
    (tmp_path / "train_bench.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    lines = common.goal_report(tmp_path)
    assert f"{title}: cuda-lean 1.48x vs eager-amp (goal 1.3x) met; vs eager NCHW 2.63x" in lines, lines
    rows = _step_rows(("eager", 10.0), ("eager-cl", 8.0), ("cpu", 9.0), ("cpu-cl", 5.0), ("cpu-lean", 6.0),
                      ("triton", 20.0), ("reference", 1.0))
    (tmp_path / "train_bench.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    lines = common.goal_report(tmp_path)
    assert (f"{title}: cpu-cl 1.60x vs eager-cl (goal 1.3x) met (the fastest cpu row of cpu, cpu-cl, cpu-lean); "
            "vs eager NCHW 2.00x") in lines, lines
    assert f"{title}: triton 0.40x vs eager-cl (goal 1.3x) NOT met; vs eager NCHW 0.50x" in lines, lines
    assert not any("reference" in line.split(": ", 1)[1] for line in lines if line.startswith(title)), lines
    # an ASPP goal: a CUDA-graph replay is no fused row a user's call is compared with
    aspp = [{**r, "op": "aspp", "mode": "train_fwd"} for r in _step_rows(("eager", 2.0), ("cuda", 1.0),
                                                                            ("cuda-graph", 0.5))]
    (tmp_path / "aspp_goal.json").write_text(json.dumps({"meta": {}, "rows": aspp}))
    lines = common.goal_report(tmp_path)
    assert "ASPP train forward vs best eager [s, bf16, N16, test GPU]: cuda 2.00x vs eager (goal 1.8x) met" in lines
    assert not any("cuda-graph" in line for line in lines if line.startswith("ASPP")), lines


def test_a_source_tree_without_its_extension_comes_after_an_installed_deeplab_ops(tmp_path, monkeypatch):
    # After a regular install (pip install .), the benchmarks put the checkout's deeplab_ops, which has no _C, first
    # on sys.path and stopped on its missing extension, with advice (run from another folder) that did not help.
    import importlib.util
    import sys

    tree = tmp_path / "checkout"
    (tree / "deeplab_ops").mkdir(parents=True)
    monkeypatch.setattr(common, "REPO_ROOT", tree)
    monkeypatch.setattr(sys, "path", list(sys.path))
    common._add_repository_root()  # deeplab_ops is importable here (the tests' own): the tree goes last
    assert sys.path[-1] == str(tree)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tree)])
    (tree / "deeplab_ops" / "_C.abi3.so").write_bytes(b"")  # built in place (or an editable install): first
    common._add_repository_root()
    assert sys.path[0] == str(tree)
    (tree / "deeplab_ops" / "_C.abi3.so").unlink()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tree)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # nothing installed: first
    common._add_repository_root()
    assert sys.path[0] == str(tree)
