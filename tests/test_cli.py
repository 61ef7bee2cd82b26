import gzip
import json
import shutil
import subprocess
import sys

import pytest
import torch

from widedeep.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_json_prints_one_object_with_the_contract_keys(capsys, diabetes_dir):
    code, out, err = run_cli(capsys, "train", "--preset", "lecture", "--epochs", "5", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["widths"] == [6, 4] and summary["epochs"] == 5
    assert summary["dataset"] == "diabetes" and summary["test_auc"] is not None


def test_train_prints_a_readable_summary(capsys):
    code, out, _ = run_cli(capsys, "train", "--dataset", "iris", "--epochs", "3")
    assert code == 0
    assert "confusion matrix" in out and "setosa" in out


def test_out_writes_a_complete_run_folder(capsys, tmp_path):
    out = tmp_path / "run"
    code, *_ = run_cli(capsys, "train", "--dataset", "iris", "--epochs", "3", "--out", str(out))
    assert code == 0
    assert {p.name for p in out.iterdir()} == {
        "config.json", "report.json", "environment.json", "history.json", "probes.json",
        "COMPLETE"}
    assert json.loads((out / "config.json").read_text())["dataset"] == "iris"
    code, _, err = run_cli(capsys, "train", "--dataset", "iris", "--epochs", "3",
                           "--out", str(out))
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("where,words", [
    ("a file", "output folder '{f}' is a file"),
    ("under a file", "cannot create folder '{f}': '{f}' is a file"),
    ("non-empty", "output folder '{d}' already exists and is not empty"),
])
def test_a_bad_out_is_refused_before_training(capsys, tmp_path, monkeypatch, where, words):
    import widedeep.batched_run
    import widedeep.run

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(widedeep.run, "run_experiment", no_training)
    monkeypatch.setattr(widedeep.batched_run, "run_group", no_training)
    f, d = tmp_path / "file", tmp_path / "full"
    f.write_text("x")
    d.mkdir()
    (d / "keep").write_text("x")
    out = {"a file": f, "under a file": f / "run", "non-empty": d}[where]
    code, _, err = run_cli(capsys, "train", "--dataset", "iris", "--out", str(out))
    assert code == 2 and err.strip() == "error: " + words.format(f=f, d=d)
    assert f.read_text() == "x" and [p.name for p in d.iterdir()] == ["keep"]


@pytest.mark.parametrize("argv,words", [
    (["--out", "{f}"], "cannot create folder '{f}': '{f}' is a file"),
    (["--storage", "bogus://x"], "storage must be a database URL"),
    (["--storage", "sqlite://"], "in-memory SQLite database"),
    (["--storage", "sqlite:///:memory:"], "in-memory SQLite database"),
])
def test_report_refuses_a_bad_out_or_storage_before_any_work(capsys, tmp_path, argv, words):
    f = tmp_path / "file"
    f.write_text("x")
    argv = [a.format(f=f) for a in argv]
    code, out, err = run_cli(capsys, "report", "--profile", "tiny", "--quiet",
                             *(["--out", str(tmp_path / "results")] if "--out" not in argv
                               else []), *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and words.format(f=f) in lines[0], err
    assert not (tmp_path / "results").exists() and f.read_text() == "x"


def test_a_file_system_error_is_one_line_not_a_traceback(capsys, monkeypatch):
    import widedeep.run

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", "/data/x")

    monkeypatch.setattr(widedeep.run, "run_experiment", disk_full)
    code, _, err = run_cli(capsys, "train", "--dataset", "iris")
    assert (code, err) == (1, "error: '/data/x' No space left on device\n")


def test_a_net_too_big_for_memory_is_one_error_line(capsys):
    """A real failed allocation: 40 billion units x 4 features x 4 bytes (596 GiB)."""
    code, _, err = run_cli(capsys, "train", "--dataset", "iris", "--widths", "40000000000")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: out of memory: ")


@pytest.mark.parametrize("error,words", [
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                  "3221225472 bytes. Error code 12"), "a block of 3.0 GiB"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
     "CUDA out of memory. Tried to allocate 2.00 GiB"),
    (MemoryError(), "MemoryError"),
])
def test_out_of_memory_names_what_did_not_fit(capsys, monkeypatch, error, words):
    import widedeep.run

    def too_big(*args, **kwargs):
        raise error

    monkeypatch.setattr(widedeep.run, "run_experiment", too_big)
    code, _, err = run_cli(capsys, "train", "--dataset", "iris")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and words in lines[0]


def test_other_runtime_errors_are_not_called_out_of_memory(monkeypatch):
    import widedeep.run

    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(widedeep.run, "run_experiment", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["train", "--dataset", "iris"])


def test_top_level_help_describes_the_tool_for_its_users():
    proc = subprocess.run([sys.executable, "-m", "widedeep", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    head = proc.stdout.split("positional arguments")[0]
    assert "tabular classification" in head and "``" not in head  # no docstring markup
    for command in ("train", "sweep", "search", "report", "activations", "datasets"):
        assert command in proc.stdout


def test_the_command_exits_without_collecting_what_it_imported():
    # `python -m widedeep` freezes the objects alive at its end, so Python's shutdown does
    # not walk them; main() (which the tests call) leaves the collector alone.
    script = """import atexit, gc, runpy, sys
from widedeep.cli import main
main(["activations"])
print("after main:", gc.get_freeze_count())
atexit.register(lambda: print("at exit:", gc.get_freeze_count() > 1000))
sys.argv = ["widedeep", "activations"]
runpy.run_module("widedeep", run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "after main: 0\n" in proc.stdout
    assert proc.stdout.endswith("at exit: True\n")
    assert proc.stdout.count("softsign") == 2  # both listings whole


def test_listing_commands(capsys):
    code, out, _ = run_cli(capsys, "activations")
    assert code == 0 and "softmax" in out and "threshold" in out
    code, out, _ = run_cli(capsys, "datasets")
    assert code == 0 and "breast_cancer" in out


def _csv(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_INPUTS = [
    (["--activation", "swish9"], "unknown activation 'swish9'"),
    (["--depth", "-2"], "depth must be >= 1, got depth=-2"),
    (["--depth", "two"], "invalid int value: 'two'"),
    (["--device", "cuda"], "no CUDA device"),
    (["--dataset", "mnist"], "mnist"),
    (["--split", "cv:1"], "cv:1"),
    (["--batch-size", "big"], "'big'"),
    (["--lr", "0"], "lr out of range"),
    (["--widths", "4,,3"], "widths has an empty item: widths='4,,3'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--csv", "x.csv", "--target", "y"], "give --dataset or --csv, not both"),
    # iris: 120 training rows (holdout), 75 per fold (cv:2)
    (["--norm", "batch", "--batch-size", "1"], "batch norm needs at least 2 rows per batch"),
    (["--norm", "batch", "--batch-size", "7"], "120 training rows in batches of 7 leave a "
                                               "last batch of 1 row"),
    (["--norm", "batch", "--batch-size", "37", "--split", "cv:2", "--engine", "batched"],
     "75 training rows in batches of 37 leave a last batch of 1 row"),
]


@pytest.mark.parametrize("argv,words", BAD_INPUTS)
def test_bad_input_exits_2_with_one_error_line(capsys, argv, words):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run_cli(capsys, "train", "--dataset", "iris", "--epochs", "1", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]


CSV_CASES = [
    ("missing", None, "does not exist"),
    ("empty", "", "empty"),
    ("ragged", "a,b,y\n1,2,x\n3,y\n", "row 3"),
    ("text", "a,b,y\n1,2,x\n3,oops,y\n", "'oops'"),
    ("nan", "a,b,y\n1,2,x\n3,nan,y\n", "NaN"),
    ("inf", "a,b,y\n1,2,x\n3,inf,y\n", "infinite"),
    ("one class", "a,b,y\n1,2,x\n3,4,x\n", "two classes"),
    ("no target", "a,b,c\n1,2,x\n3,4,y\n", "'y'"),
    ("missing label", "a,b,y\n1,2,x\n3,4, \n5,6,z\n", "row 3 has no target value"),
    ("duplicate target", "y,a,y\n1,2,1\n3,4,0\n", "'y' appear(s) more than once"),
    ("semicolons", "a;b;y\n1;2;x\n3;4;y\n", "separated by ';'"),
]


@pytest.mark.parametrize("case,text,words", CSV_CASES, ids=[c[0] for c in CSV_CASES])
def test_bad_csv_exits_2_naming_the_problem(capsys, tmp_path, case, text, words):
    path = str(tmp_path / "absent.csv") if text is None else _csv(tmp_path, text)
    code, _, err = run_cli(capsys, "train", "--csv", path, "--target", "y", "--epochs", "1")
    assert code == 2, err
    assert err.startswith("error: ") and words.lower() in err.lower() and err.count("\n") == 1


def test_corrupt_gzip_csv(capsys, tmp_path):
    path = tmp_path / "data.csv.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    code, _, err = run_cli(capsys, "train", "--csv", str(path), "--target", "y")
    assert code == 2 and err.startswith("error: ")


def test_csv_with_string_target_trains(capsys, tmp_path):
    rows = "".join(f"{i % 7},{(i * 3) % 5},{'yes' if i % 2 else 'no'}\n" for i in range(40))
    path = tmp_path / "data.csv.gz"
    path.write_bytes(gzip.compress(("a,b,y\n" + rows).encode()))
    code, out, _ = run_cli(capsys, "train", "--csv", str(path), "--target", "y", "--epochs",
                           "2", "--json")
    assert code == 0 and json.loads(out)["class_names"] == ["no", "yes"]


def test_checksum_mismatch_is_refused(capsys, tmp_path, monkeypatch, diabetes_dir):
    bad = tmp_path / "diabetes.csv.gz"
    shutil.copy(diabetes_dir / "diabetes.csv.gz", bad)
    bad.chmod(0o644)
    with bad.open("ab") as f:
        f.write(b"\0")
    monkeypatch.setenv("WIDEDEEP_DATA", str(tmp_path))
    code, _, err = run_cli(capsys, "train", "--preset", "lecture", "--epochs", "1")
    assert code == 2 and "checksum mismatch" in err


def test_offline_without_the_file_says_where_to_put_it(capsys, monkeypatch):
    monkeypatch.delenv("WIDEDEEP_DATA", raising=False)
    code, _, err = run_cli(capsys, "train", "--preset", "lecture", "--epochs", "1")
    assert code == 2 and "WIDEDEEP_DATA" in err and "Traceback" not in err


def test_console_entry_point_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "widedeep", "train", "--depth", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: depth must be >= 1, got depth=-1\n"


def test_engine_flag_is_honoured(capsys):
    argv = ["train", "--dataset", "iris", "--epochs", "4", "--json"]
    code, out, _ = run_cli(capsys, *argv, "--engine", "batched")
    batched = json.loads(out)
    code2, out, _ = run_cli(capsys, *argv, "--engine", "plain")
    plain = json.loads(out)
    assert (code, code2) == (0, 0)
    assert (batched["engine"], plain["engine"]) == ("batched", "plain")
    assert batched["final_train_loss"] == pytest.approx(plain["final_train_loss"], rel=1e-5)
    code, out, _ = run_cli(capsys, *argv, "--engine", "batched", "--norm", "batch")
    assert code == 0 and json.loads(out)["engine"] == "batched"
