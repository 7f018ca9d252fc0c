"""Hostile and broken file systems around outputs and copied files.

- Never overwrite an input covers every file an input directory's loader reads: no output goes
  inside an input directory, at any depth.
- Concurrent runs: the existence check and the final move are one step (a no-replace rename),
  so of two runs writing one new output exactly one wins and the winner's output is intact.
- Temporaries are owned (a flock on a marker holding the token of the name): cleanup removes a
  killed writer's temporary, never a live writer's, a forged name, a link, or a FIFO trap.
- A full disk under stdout output says the output is incomplete and exits 3.
- Files copied from a model directory never follow a link out of it (HF cache snapshots work).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftcli.checkpoint import atomic
from peftcli.checkpoint.atomic import atomic_output, clean_stale_temps
from peftcli.checkpoint.reader import open_checkpoint
from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import cli
from peftcli.errors import BadInputError, UsageError
from tests.helpers import noisy_copy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "0123456789abcdef" * 2  # a well-formed token: 32 hex digits


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def tree(root) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its bytes (links as their target text, FIFOs unread)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif not os.path.isfile(path):
                out[rel] = "not a regular file"
            else:
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def temporaries(directory) -> list[str]:
    return [n for n in os.listdir(directory) if atomic.TEMP_MARK in n]


def one_error_line(result, code: int, message: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr


@pytest.fixture(scope="module")
def sharded(tiny_llama, tmp_path_factory):
    """A sharded copy of the tiny llama (index + shards) and a fine-tune of it."""
    d = tmp_path_factory.mktemp("sharded")
    with open_checkpoint(tiny_llama) as ckpt:
        sd = {n: ckpt.get(n) for n in ckpt}
    save_state_dict(sd, str(d / "base"), max_shard_size="200KB", source_dir=tiny_llama)
    noisy_copy(tiny_llama, str(d / "ft"), seed=3)
    assert "model.safetensors.index.json" in os.listdir(d / "base")
    return str(d / "base"), str(d / "ft")


# -- outputs inside inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("inside", ["model.safetensors", "merged", "merged/model.safetensors", "model-00009-of-00009.safetensors"])
def test_no_output_goes_inside_an_input_directory(sharded, inside):
    # A new model.safetensors beside the index made transformers load the merged weights from
    # the base; a new shard or subdirectory is read by loaders too (PEFT keeps adapters in
    # subdirectories).
    base, ft = sharded
    before = tree(base)
    result = invoke("merge", base, ft, "-o", os.path.join(base, inside))
    one_error_line(result, 2, "is inside the input directory")
    with pytest.raises(UsageError, match="is inside the input directory"):
        save_state_dict({"w": torch.ones(2)}, os.path.join(base, inside), inputs=[base], force=True)
    assert tree(base) == before


def test_an_output_reached_through_a_link_into_an_input_directory_is_refused(sharded, tmp_path):
    base, _ = sharded
    os.symlink(base, tmp_path / "alias")
    with pytest.raises(UsageError, match="is inside the input directory"):
        save_state_dict({"w": torch.ones(2)}, str(tmp_path / "alias" / "new.safetensors"), inputs=[base])
    assert not os.path.exists(os.path.join(base, "new.safetensors"))


# -- concurrent writers -------------------------------------------------------------------------


def _write(path: str, directory: bool, data: bytes) -> None:
    with open(os.path.join(path, "model.safetensors") if directory else path, "wb") as f:
        f.write(data)


def _read(path: str, directory: bool) -> bytes:
    with open(os.path.join(path, "model.safetensors") if directory else path, "rb") as f:
        return f.read()


@pytest.fixture(params=["renameat2", "fallback"])
def rename_mode(request, monkeypatch):
    if request.param == "fallback":  # a kernel, libc or file system without RENAME_NOREPLACE
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    else:
        assert atomic._RENAMEAT2 is not None, "this libc has no renameat2"
    return request.param


@pytest.mark.parametrize("directory", [False, True], ids=["file", "dir"])
def test_an_output_that_appears_while_building_is_kept_and_this_run_fails(tmp_path, directory, rename_mode):
    target = str(tmp_path / ("out" if directory else "out.safetensors"))
    with pytest.raises(UsageError, match="already exists"):
        with atomic_output(target, directory=directory) as tmp:
            _write(tmp, directory, b"mine")
            # Another run, started after our existence check, finishes first.
            if directory:
                os.mkdir(target)
            _write(target, directory, b"theirs")
    assert _read(target, directory) == b"theirs"
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("directory", [False, True], ids=["file", "dir"])
def test_of_two_concurrent_writers_exactly_one_wins_and_its_output_is_intact(tmp_path, directory, rename_mode):
    target = str(tmp_path / "out")
    both_built = threading.Barrier(2, timeout=60)
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            with atomic_output(target, directory=directory) as tmp:
                _write(tmp, directory, f"writer {i}".encode())
                both_built.wait()  # both passed the existence check; neither has moved yet
            results[i] = "ok"
        except UsageError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [i for i, r in results.items() if r == "ok"]
    losers = [r for r in results.values() if r != "ok"]
    assert len(winners) == 1 and len(losers) == 1, results
    assert "already exists" in losers[0].message
    assert _read(target, directory) == f"writer {winners[0]}".encode()
    assert temporaries(tmp_path) == []


def test_force_still_replaces_a_directory_whole(tmp_path):
    target = str(tmp_path / "d")
    save_state_dict({"w": torch.ones(2)}, target, max_shard_size=8)
    save_state_dict({"v": torch.ones(1)}, target, force=True)
    assert sorted(os.listdir(target)) == ["model.safetensors"] and temporaries(tmp_path) == []


# -- temporaries: owned, and only provably stale ones removed -----------------------------------


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from peftcli.checkpoint.atomic import atomic_output
    with atomic_output(sys.argv[1], directory=True) as tmp:
        open(os.path.join(tmp, "model.safetensors"), "wb").write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    """
)

LIVE_WRITER = textwrap.dedent(
    """
    import sys
    from peftcli.checkpoint.atomic import atomic_output
    with atomic_output(sys.argv[1], directory=False) as tmp:
        open(tmp, "wb").write(b"child")
        print(tmp, flush=True)
        sys.stdin.readline()  # stays alive, mid-write, until told to finish
    """
)


def _forgeries(d) -> list[str]:
    """Entries whose names look like peftcli temporaries but that peftcli cannot prove its own."""
    made = []
    # Someone's directory, named like a temporary of an older peftcli (a PID nobody has).
    old = d / f".data.peftcli-tmp-{2**22 + 12345}-deadbeef"
    old.mkdir()
    (old / "precious.txt").write_text("keep me")
    # The exact new name, without a marker.
    bare = d / f".data.peftcli-tmp-{TOKEN}"
    bare.mkdir()
    (bare / "precious.txt").write_text("keep me")
    # A marker that does not hold the token of the name.
    wrong = d / f".other.peftcli-tmp-{'f' * 32}"
    wrong.mkdir()
    (wrong / atomic.OWNER_FILE).write_text(TOKEN)
    # A FIFO as the marker: opening it must not hang, and it is not proof.
    fifo = d / f".fifo.peftcli-tmp-{'e' * 32}"
    fifo.mkdir()
    os.mkfifo(fifo / atomic.OWNER_FILE)
    # A symlink with the right name to a directory whose marker is complete and unlocked.
    victim = d / "victim"
    victim.mkdir()
    (victim / atomic.OWNER_FILE).write_text("d" * 32)
    (victim / "precious.txt").write_text("keep me")
    os.symlink(victim, d / f".link.peftcli-tmp-{'d' * 32}")
    # A plain file with the right name.
    (d / f".file.peftcli-tmp-{'c' * 32}").write_text("keep me")
    made += [old, bare, wrong, fifo, victim, d / f".link.peftcli-tmp-{'d' * 32}", d / f".file.peftcli-tmp-{'c' * 32}"]
    return [str(p) for p in made]


@pytest.mark.timeout(120)
def test_cleanup_removes_a_killed_writers_temporary_and_nothing_it_cannot_prove_stale(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "out")], cwd=ROOT, timeout=100)
    assert proc.returncode == -signal.SIGKILL
    (killed,) = temporaries(tmp_path)
    forged = _forgeries(tmp_path)
    before = tree(tmp_path)
    save_state_dict({"w": torch.ones(2)}, str(tmp_path / "out"))  # a run in the same directory cleans up
    assert not os.path.lexists(tmp_path / killed)
    assert all(os.path.lexists(p) for p in forged)
    after = tree(tmp_path)
    assert {k: v for k, v in before.items() if not k.startswith(killed)} == {k: v for k, v in after.items() if k != "out/model.safetensors"}
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["w"].tolist() == [1.0, 1.0]


@pytest.mark.timeout(120)
def test_a_live_writers_temporary_survives_cleanup_in_another_process(tmp_path):
    target = str(tmp_path / "child.bin")
    child = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, target], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        tmp = child.stdout.readline().strip()
        assert tmp and os.path.isfile(tmp), tmp
        assert clean_stale_temps(str(tmp_path)) == []
        save_state_dict({"w": torch.ones(2)}, str(tmp_path / "other.safetensors"))  # cleans the same directory
        assert os.path.isfile(tmp)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(100) == 0
    finally:
        child.kill()
        child.wait()
    with open(target, "rb") as f:
        assert f.read() == b"child"
    assert temporaries(tmp_path) == []


def test_a_writer_in_this_process_keeps_its_temporary_too(tmp_path):
    # flock belongs to the open file, not the process: a second output written by the same
    # process (training writes best/ beside its state) does not remove the first one's.
    with atomic_output(str(tmp_path / "a"), directory=True) as a:
        _write(a, True, b"a")
        save_state_dict({"w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
        assert os.path.isfile(os.path.join(a, "model.safetensors"))
    assert _read(str(tmp_path / "a"), True) == b"a"


def test_temporary_names_are_unforgeable_and_short_enough(tmp_path):
    names = set()
    for _ in range(3):
        with atomic_output(str(tmp_path / ("x" * 250)), directory=False, force=True) as tmp:
            _write(tmp, False, b"")
            (name,) = temporaries(tmp_path)
            names.add(name)
            token = name.rsplit(atomic.TEMP_MARK, 1)[1]
            assert len(token) == 32 and int(token, 16) >= 0  # 128 random bits, no PID
            with open(os.path.join(tmp_path, name, atomic.OWNER_FILE)) as f:
                assert f.read() == token
    assert len(names) == 3


# -- a full disk under stdout -------------------------------------------------------------------


@pytest.mark.timeout(200)
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_on_stdout_says_the_output_is_incomplete_and_exits_3(tiny_llama, tmp_path):
    ft = noisy_copy(tiny_llama, str(tmp_path / "ft"), seed=5)
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "peftcli", "merge", tiny_llama, ft], cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True, timeout=180
        )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "no space left on device" in proc.stderr and "incomplete" in proc.stderr and "stdout" in proc.stderr


# -- files copied from a model directory --------------------------------------------------------


def _model_copy(src: str, dest) -> str:
    dest.mkdir()
    for name in os.listdir(src):
        shutil.copyfile(os.path.join(src, name), dest / name)
    return str(dest)


@pytest.mark.parametrize("name", ["tokenizer_extra.json", "config.json"])
def test_a_link_out_of_the_model_directory_is_refused_not_copied(tiny_llama, tmp_path, name):
    secret = tmp_path / "secret"
    secret.write_text("root:$6$hash")
    model = _model_copy(tiny_llama, tmp_path / "model")
    os.unlink(os.path.join(model, name)) if os.path.exists(os.path.join(model, name)) else None
    os.symlink(secret, os.path.join(model, name))
    with pytest.raises(BadInputError, match=f"{name} is a symlink to .*secret, outside the model directory"):
        save_state_dict({"w": torch.ones(2)}, str(tmp_path / "out"), source_dir=model)
    result = invoke("merge", model, noisy_copy(tiny_llama, str(tmp_path / "ft"), seed=1), "-o", tmp_path / "merged")
    one_error_line(result, 1, "outside the model directory")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "merged")
    assert temporaries(tmp_path) == []


def test_a_relative_link_climbing_out_is_refused_and_one_inside_is_copied(tiny_llama, tmp_path):
    model = _model_copy(tiny_llama, tmp_path / "model")
    (tmp_path / "model" / "extra").mkdir()
    (tmp_path / "model" / "extra" / "vocab.json").write_text('{"a": 1}')
    os.symlink("extra/vocab.json", os.path.join(model, "vocab.json"))  # inside: its content is copied
    save_state_dict({"w": torch.ones(2)}, str(tmp_path / "ok"), source_dir=model)
    assert not os.path.islink(tmp_path / "ok" / "vocab.json") and (tmp_path / "ok" / "vocab.json").read_text() == '{"a": 1}'
    (tmp_path / "outside.txt").write_text("private")
    os.symlink("../outside.txt", os.path.join(model, "merges.txt"))
    with pytest.raises(BadInputError, match="merges.txt is a symlink"):
        save_state_dict({"w": torch.ones(2)}, str(tmp_path / "bad"), source_dir=model)


def test_a_hugging_face_cache_snapshot_still_works(tiny_llama, tmp_path):
    # models--ORG--NAME/snapshots/REV/FILE -> ../../blobs/HASH, as huggingface_hub lays it out.
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name in os.listdir(tiny_llama):
        with open(os.path.join(tiny_llama, name), "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / name)
    ft = noisy_copy(tiny_llama, str(tmp_path / "ft"), seed=2)
    result = invoke("merge", snapshot, ft, "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.stderr
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        path = tmp_path / "merged" / name
        assert path.is_file() and not path.is_symlink()
        with open(os.path.join(tiny_llama, name), "rb") as f:
            assert path.read_bytes() == f.read()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
