"""What the command line says when a place it was given is wrong: one line naming the place, exit status 2, and for
``aeserve train`` before any data is read or anything is written, not after training."""
import errno
import os
import sys
from pathlib import Path

import pytest

from aeserve.cli import main
from aeserve.training import cli

ROOT = Path(__file__).resolve().parents[2]
MLP, PCA = str(ROOT / "configs" / "digits-mlp8.toml"), str(ROOT / "configs" / "digits-pca8.toml")
TINY = ["--quiet", "--set", "data.limit=200", "--set", "train.epochs=1", "--set", "train.report=false"]
NAME_RULE = "use 1-100 letters, digits, '_', '.', '-', starting with a letter or digit, without '..'"


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if ``aeserve train`` gets as far as training."""
    monkeypatch.setattr(cli, "train", lambda *args, **kwargs: pytest.fail("trained although a pre-flight check should have failed"))


@pytest.fixture
def read_only(monkeypatch) -> list[Path]:
    """Folders that act as a read-only mount does, for root too (whom chmod does not stop): creating a file or folder
    in one raises EROFS. Returns the list to put the folders in."""
    folders: list[Path] = []
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path) -> OSError | None:
        absolute = Path(os.fsdecode(path)).absolute()
        if any(absolute == f or f in absolute.parents for f in folders):
            return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return None

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and (e := refused(path)):
            raise e
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if e := refused(path):
            raise e
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    return folders


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if ``aeserve train`` reads its data (the recipe reads it to size itself, the trainer to train)."""
    def read(*args, **kwargs):
        pytest.fail("read the data although a pre-flight check should have failed")

    monkeypatch.setattr("aeserve.training.recipes.load_dataset", read)
    monkeypatch.setattr("aeserve.training.trainer.load_dataset", read)


@pytest.mark.parametrize("name", ["../../escaped", "a/b", ".hidden"])
@pytest.mark.parametrize("source", ["config", "data"])
def test_an_invalid_name_fails_before_the_data_is_read_and_writes_nothing(tmp_path, monkeypatch, capsys, no_data, name, source):
    work = tmp_path / "work"
    work.mkdir()
    (work / "rows.csv").write_text("a,b,c\n" + "".join(f"{i % 3},{i % 5},{i % 7}\n" for i in range(40)))
    monkeypatch.chdir(work)
    before = sorted(tmp_path.rglob("*"))
    what = [MLP] if source == "config" else ["--data", "rows.csv"]
    assert main(["train", *what, "--name", name, "--registry", "registry", *TINY]) == 2
    assert capsys.readouterr().err.strip() == f"error: invalid model name {name!r}: {NAME_RULE}"
    assert sorted(tmp_path.rglob("*")) == before  # no state folder (.aeserve/state/../../escaped was outside it), no registry


def test_a_registry_or_state_folder_that_is_a_file_fails_before_training(tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)
    Path("file").write_text("not a folder")
    assert main(["train", PCA, "--registry", "file", *TINY]) == 2
    assert capsys.readouterr().err.strip() == "error: file/digits-pca8: file is a file; expected a writable folder for the registry"
    assert main(["train", PCA, "--registry", "file/registry", *TINY]) == 2
    assert capsys.readouterr().err.strip() == "error: file/registry/digits-pca8: file is a file; expected a writable folder for the registry"
    assert main(["train", PCA, "--registry", "registry", "--state-dir", "file", *TINY]) == 2
    assert capsys.readouterr().err.strip() == "error: file: is a file; expected a writable folder for the training state (or give --state-dir)"
    assert main(["models", "--registry", "file"]) == 2
    assert capsys.readouterr().err.strip() == "error: file: is a file; expected a folder for the registry"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_read_only_registry_or_working_folder_fails_before_training(tmp_path, monkeypatch, capsys, no_training, read_only):
    (tmp_path / "registry").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    read_only.append(tmp_path / "registry")
    assert main(["train", PCA, "--registry", str(tmp_path / "registry"), *TINY]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}/registry/digits-pca8: cannot create it in {tmp_path}/registry "
                                               "(Read-only file system); expected a writable folder for the registry")
    read_only[:] = [tmp_path / "work"]  # the default state folder, .aeserve/state/NAME, is under the working folder
    assert main(["train", PCA, "--registry", str(tmp_path / "registry"), *TINY]) == 2
    assert capsys.readouterr().err.strip() == ("error: .aeserve/state/digits-pca8: cannot create it in . (Read-only file system); "
                                               "expected a writable folder for the training state (or give --state-dir)")


def test_a_full_disk_at_publishing_names_where_it_was_writing(tmp_path, monkeypatch, capsys):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write or fsync reports it: without a path

    monkeypatch.setattr("aeserve.models.registry.write_synced", full)
    state, registry = tmp_path / "state", tmp_path / "registry"
    assert main(["train", PCA, "--registry", str(registry), "--state-dir", str(state), *TINY]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {state} or {registry}: No space left on device"


def test_out_that_is_a_file_is_refused_before_the_work(tmp_path, capsys):
    registry, out = str(tmp_path / "registry"), str(tmp_path / "file")
    assert main(["train", PCA, "--registry", registry, "--state-dir", str(tmp_path / "state"), *TINY]) == 0
    Path(out).write_text("not a folder")
    capsys.readouterr()
    assert main(["export", "digits-pca8", "--registry", registry, "--out", out]) == 2
    assert capsys.readouterr().err.strip() == f"error: {out}: is a file; expected a folder for the ONNX models (--out)"
    assert main(["eval", "digits-pca8", "--registry", registry, "--out", out]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {out}: is a file; expected a folder for the report (--out)"
    assert "re-measured" not in captured.out  # refused before the minutes of re-measuring, not after


@pytest.mark.parametrize(("error", "line"), [
    (OSError(errno.EROFS, "Read-only file system", "registry/m/.lock"), "error: registry/m/.lock: Read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "registry/m"), "error: registry/m: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), "error: No space left on device"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "a", None, "b"), "error: a -> b: No such file or directory"),
    # "file" is a file: a folder made there, or under it, names it
    (FileExistsError(errno.EEXIST, "File exists", "file"), "error: file: is a file, not a folder"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "file/sub/m"), "error: file/sub/m: file is a file, not a folder"),
])
def test_an_os_error_of_the_users_is_one_line(monkeypatch, capsys, tmp_path, error, line):
    def fails(args):
        raise error

    monkeypatch.chdir(tmp_path)
    Path("file").write_text("not a folder")
    monkeypatch.setattr(cli, "cmd_models", fails)
    assert main(["models", "--registry", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == line


def test_an_os_error_that_is_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def fails(args):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(cli, "cmd_models", fails)
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["models", "--registry", str(tmp_path)])


def test_a_reader_that_closed_stdout_ends_the_command_quietly(tmp_path, monkeypatch, capsys):
    read, write = os.pipe()
    os.close(read)  # as `aeserve models | head -1` once head has its line
    stdout = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert main(["models", "--registry", str(tmp_path)]) == 141  # 128 + SIGPIPE, as a shell reports a command it killed
        stdout.write("more")
        stdout.flush()  # stdout now leads to /dev/null: what is left to flush at exit raises nothing
    finally:
        monkeypatch.undo()
        stdout.close()
    assert capsys.readouterr().err == ""


@pytest.fixture
def no_s3_credentials(monkeypatch):
    """An environment with no AWS credentials anywhere, and an endpoint nothing listens on (never reached: signing fails first)."""
    s3fs = pytest.importorskip("s3fs", reason="s3fs is the aeserve[s3] extra")
    from tests.servers import free_port

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    s3fs.S3FileSystem.clear_instance_cache()  # a filesystem made earlier in this process holds the credentials it found
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("command", [
    ["models"], ["alias", "m", "1", "prod"], ["eval", "m"], ["export", "m", "--out", "onnx"], ["train", PCA, *TINY]])
def test_missing_store_credentials_are_one_line_naming_the_url(tmp_path, monkeypatch, capsys, no_s3_credentials, no_training, command):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--registry", "s3://bucket/models"]) == 2
    assert capsys.readouterr().err.strip() == "error: s3://bucket/models: Unable to locate credentials"


def test_data_in_a_store_without_credentials_is_one_line_naming_its_url(tmp_path, monkeypatch, capsys, no_s3_credentials, no_training):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "s3://bucket/rows.csv", "--registry", "registry", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "error: s3://bucket/rows.csv: Unable to locate credentials"


def test_a_store_that_cannot_be_reached_is_one_line_naming_the_url(tmp_path, monkeypatch, capsys, no_s3_credentials):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert main(["models", "--registry", "s3://bucket/models"]) == 2  # connection refused at once; two tries (models/remote.py)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: s3://bucket/models: Could not connect to the endpoint URL: \"{os.environ['AWS_ENDPOINT_URL']}/bucket?")


def test_a_registry_bucket_that_does_not_exist_fails_before_training(s3_bucket, tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.chdir(tmp_path)
    missing = f"{s3_bucket}-missing/models"
    assert main(["train", PCA, "--registry", missing, *TINY]) == 2
    assert capsys.readouterr().err.strip() == f"error: {missing}: the bucket does not exist"
