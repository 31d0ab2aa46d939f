"""`capkit` on bad input and faults: one `error:` line (and a hint), a non-zero exit, no traceback.

Most cases call `toolkit.cli.main()` in this process (with `sys.argv` set), the
same function the `capkit` script runs, so exit codes and stderr are the real
ones without paying a TensorFlow import per case; two subprocess runs check
the script itself and `--debug`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import encoder_with_cache
from test_images import BAD, GOOD, MAX_PIXELS, write
from toolkit.cli import main
from toolkit.encoder import ENCODERS_DIR, CacheWriteError
from toolkit.errors import CapkitError
from toolkit.images import list_images

REPO = Path(__file__).resolve().parents[1]


def capkit(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `capkit ARGS` through main(): (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["capkit", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(err: str, message: str, hint: str | None = None) -> None:
    """stderr holds exactly one `error:` line with `message`, the hint if any, and no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    if hint:
        hints = [line for line in err.splitlines() if line.startswith("  hint: ")]
        assert len(hints) == 1 and hint in hints[0], err


@pytest.fixture
def fast_build(monkeypatch, tiny_encoder):
    """Encoders of the tests' kind (random init, 71 px) come from the session's model, not a new build.

    The same seed builds the same weights, so identities and digests are those of a real build.
    """
    import toolkit.encoder

    real = toolkit.encoder._build

    def build(config, weights):
        if weights == "none" and config.image_size == 71:
            return tiny_encoder.model
        return real(config, weights)

    monkeypatch.setattr(toolkit.encoder, "_build", build)


def error_cases(tmp: Path, data: dict, packs: Path) -> dict:
    """name -> (argv, message, hint or None); `tmp` is the test's own folder."""
    blocker = tmp / "a-file"
    blocker.write_text("not a folder")
    splits = ["--train-split", data["train"], "--dev-split", data["dev"]]

    def build(captions=data["captions_en"], images=data["images"], packs_dir=tmp / "packs"):
        return ["build-pack", "en", "--captions", captions, "--images", images, *splits, "--packs-dir", packs_dir,
                "--source-lang", "en", "--encoder-weights", "none", "--image-size", "71", "--self-critical-epochs", "0"]

    caption = ["caption", data["images"], "--packs-dir", packs]
    return {
        "invalid language code": ([*caption, "--lang", "EN!"], "'EN!' is not a language code", "ISO 639-1"),
        "language the translator lacks": (
            ["translate", "--captions", data["captions_en"], "--lang", "qq", "--translator", "google",
             "-o", tmp / "out.txt", "--packs-dir", tmp / "packs"],
            "google does not support language code 'qq'", "google accepts"),
        "pack not installed": ([*caption, "--lang", "fr"], "no 'fr' pack", "installed: en, zh"),
        "beam 0": ([*caption, "--lang", "en", "--beam", "0"], "--beam must be at least 1, not 0", None),
        "beam 0 in build-pack": ([*build(), "--beam", "0"], "--beam must be at least 1, not 0", None),
        "zero epochs": ([*build(), "--epochs", "0"], "--epochs must be at least 1, not 0", None),
        "negative epochs": ([*build(), "--epochs", "-3"], "--epochs must be at least 1, not -3", None),
        "negative batch size": ([*build(), "--batch-size", "-1"], "--batch-size must be at least 1", None),
        "dropout of 1": ([*build(), "--dropout", "1"], "--dropout must be in [0, 1)", None),
        "unknown lr schedule": ([*build(), "--lr-schedule", "step"],
                                "--lr-schedule must be one of plateau, cosine, constant, not 'step'", None),
        "unknown self-critical schedule": ([*build(), "--self-critical-lr-schedule", "step"],
                                           "--self-critical-lr-schedule must be one of constant, cosine, not 'step'",
                                           None),
        "unknown self-critical reward": ([*build(), "--self-critical-reward", "bleu"],
                                         "--self-critical-reward must be one of cider-d, bleu4, cider-d+bleu4, "
                                         "not 'bleu'", None),
        "unknown precision": ([*build(), "--precision", "fp8"],
                              "--precision must be one of auto, float32, bfloat16, float16, not 'fp8'", None),
        "negative clipnorm": ([*build(), "--clipnorm", "-1"], "--clipnorm must be 0 or more, not -1", None),
        "training across machines without a cluster": ([*build(), "--strategy", "multiworker"],
                                                       "strategy 'multiworker' needs the TF_CONFIG environment variable",
                                                       '"task": {"type": "worker", "index": 0}'),
        "unknown strategy": ([*build(), "--strategy", "tpu"], "unknown strategy 'tpu'", "default, mirrored"),
        "zero pixel limit": ([*caption, "--lang", "en", "--max-pixels", "0"], "--max-pixels must be at least 1", None),
        "packs dir not writable": (build(packs_dir=blocker / "packs"), "packs folder is not writable", "--packs-dir"),
        "missing captions file": (build(captions=tmp / "captions.txt"), f"{tmp / 'captions.txt'}: no such file", None),
        "missing images folder": (build(images=tmp / "photos"), f"{tmp / 'photos'}: not a folder of images", None),
        "missing image to caption": (["caption", tmp / "photo.jpg", "--lang", "en", "--packs-dir", packs],
                                     f"{tmp / 'photo.jpg'}: no such file or folder", None),
        "missing folder to encode": (["encode", "--images", tmp / "photos", "--packs-dir", tmp / "packs"],
                                     f"{tmp / 'photos'}: no such file or folder", None),
    }


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        fake = {k: Path(d) / k for k in ("captions_en", "images", "train", "dev")}
        return list(error_cases(Path(d), fake, Path(d)))


@pytest.mark.parametrize("case", _case_names())
def test_user_errors_are_one_line_with_a_hint(case, tmp_path, tiny_dataset, tiny_packs, monkeypatch, capsys):
    argv, message, hint = error_cases(tmp_path, tiny_dataset, tiny_packs)[case]
    monkeypatch.delenv("TF_CONFIG", raising=False)  # no cluster here, whatever the shell says
    code, out, err = capkit(monkeypatch, capsys, *argv)
    assert code == 2, err
    one_error(err, message, hint)


def test_debug_shows_the_traceback(tmp_path, tiny_dataset, tiny_packs, monkeypatch, capsys):
    argv, message, _ = error_cases(tmp_path, tiny_dataset, tiny_packs)["pack not installed"]
    monkeypatch.setattr(sys, "argv", ["capkit", "--debug", *map(str, argv)])
    with pytest.raises(CapkitError, match=message):
        main()


def test_encoder_in_an_unwritable_packs_dir(tmp_path, tiny_dataset, fast_build, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    code, out, err = capkit(monkeypatch, capsys, "encode", "--images", tiny_dataset["images"], "--encoder-weights", "none",
                            "--image-size", "71", "--packs-dir", tmp_path / "a-file" / "packs")
    assert code == 2
    one_error(err, "cannot register the encoder there (Not a directory)", "--packs-dir")


@pytest.mark.parametrize("argv, message, command", [
    (["caption", "x.jpg", "--lang", "en", "--bogus"], "no such option: --bogus", "capkit caption"),
    (["caption", "x.jpg", "--bea", "3"], "no such option: --bea (Possible options: --beam)", "capkit caption"),
    (["caption", "x.jpg", "--beam", "three"], "invalid value for '--beam'", "capkit caption"),
    (["packs", "install"], "missing argument 'source'", "capkit packs install"),
    (["evaluate", "--lang", "en", "--images"], "option '--images' requires an argument", "capkit evaluate"),
    (["bogus"], "no such command 'bogus'", "capkit"),
])
def test_usage_errors_are_one_line_naming_the_commands_help(monkeypatch, capsys, argv, message, command):
    code, out, err = capkit(monkeypatch, capsys, *argv)
    assert code == 2 and "Usage:" not in err
    one_error(err, message, f"`{command} --help` lists its options and arguments")


# -- one bad file among many: reported once, the rest done and cached, exit 1 ------


def mixed_folder(tmp_path: Path, monkeypatch) -> tuple[Path, set[str], set[str]]:
    """GOOD and BAD images of test_images in one folder, plus one the user may not read."""
    from test_images import JPEG, deny

    folder = tmp_path / "mixed"
    good = write(folder, GOOD)
    bad = write(folder, BAD)
    (folder / "locked.jpg").write_bytes(JPEG)
    deny(monkeypatch, "locked.jpg")
    return folder, {str(p) for p in good.values()}, {str(p) for p in bad.values()} | {str(folder / "locked.jpg")}


def skipped_once_each(err: str, bad: set[str]) -> None:
    lines = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert len(lines) == len(bad), err
    for path in bad:
        assert sum(line.startswith(f"skipped: {path}: ") for line in lines) == 1, (path, err)
    assert f"{len(bad)} image(s) skipped; the others are done" in err
    assert "Traceback" not in err


def test_caption_a_folder_with_bad_files(tmp_path, tiny_packs, tiny_encoder, fast_build, monkeypatch, capsys):
    packs = tmp_path / "packs"
    shutil.copytree(tiny_packs, packs)
    folder, good, bad = mixed_folder(tmp_path, monkeypatch)
    code, out, err = capkit(monkeypatch, capsys, "caption", folder, "--lang", "en", "--max-pixels", MAX_PIXELS,
                            "--packs-dir", packs)
    assert code == 1
    skipped_once_each(err, bad)
    captioned = [line.split("\t")[0] for line in out.splitlines()]
    assert len(captioned) == len(good)
    assert str(folder / "café_猫.jpg") in captioned
    assert str(folder / "caf\ufffd.png") in captioned  # a name that is not UTF-8, shown as it can be

    # Everything readable was cached: a second pass extracts nothing.
    (home,) = (packs / ENCODERS_DIR).iterdir()
    again = encoder_with_cache(tiny_encoder, home).extract(list_images([folder]), max_pixels=MAX_PIXELS)
    assert (again.n_extracted, again.n_cached) == (0, len(good))
    assert set(again.failures) == bad


def test_encode_a_folder_with_bad_files(tmp_path, fast_build, monkeypatch, capsys):
    folder, good, bad = mixed_folder(tmp_path, monkeypatch)
    argv = ["encode", "--images", folder, "--encoder-weights", "none", "--image-size", "71", "--batch-size", "4",
            "--max-pixels", MAX_PIXELS, "--packs-dir", tmp_path / "packs"]
    code, out, err = capkit(monkeypatch, capsys, *argv)
    assert code == 1
    skipped_once_each(err, bad)
    assert f": {len(good)} images extracted" in out and f"{len(bad)} skipped" in out

    code, out, err = capkit(monkeypatch, capsys, *argv)
    assert code == 1
    assert ": 0 images extracted" in out and f"{len(good)} from cache" in out


# -- Ctrl-C and faults reaching main() -----------------------------------------------


def raising(exc):
    def fail(*args, **kwargs):
        raise exc

    return fail


@pytest.mark.parametrize("command", ["caption", "build-pack"])
def test_ctrl_c_exits_130_and_says_how_to_resume(command, tmp_path, tiny_dataset, monkeypatch, capsys):
    import toolkit.build
    import toolkit.captioner

    monkeypatch.setattr(*{"caption": (toolkit.captioner, "caption_images"), "build-pack": (toolkit.build, "build_pack")}[command],
                        raising(KeyboardInterrupt()))
    argv = {
        "caption": ["caption", tiny_dataset["images"], "--lang", "en", "--packs-dir", tmp_path],
        "build-pack": ["build-pack", "en", "--captions", tiny_dataset["captions_en"], "--images", tiny_dataset["images"],
                       "--splits", tiny_dataset["train"].parent, "--packs-dir", tmp_path],
    }[command]
    code, out, err = capkit(monkeypatch, capsys, *argv)
    assert code == 130
    assert "interrupted" in err and "run the same command to resume" in err and "Traceback" not in err


# (what the library raised, exit code, message, hint)
FAULTS = {
    "cache disk full": (CacheWriteError("packs/.encoders/x/features: cannot write features (No space left on device)",
                                        hint="free some disk space and run the same command again; it resumes",
                                        error_number=errno.ENOSPC),
                        2, "cannot write features (No space left on device)", "free some disk space"),
    "disk full elsewhere": (OSError(errno.ENOSPC, "No space left on device", "packs/.work/en/ckpt.h5"),
                            1, "packs/.work/en/ckpt.h5: No space left on device", "free some disk space"),
    "permission": (PermissionError(errno.EACCES, "Permission denied", "packs/en"),
                   1, "packs/en: Permission denied", "--debug"),
    "a bug": (ZeroDivisionError("division by zero"), 1, "unexpected ZeroDivisionError: division by zero", "report"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_faults_become_messages(fault, tiny_dataset, tmp_path, monkeypatch, capsys):
    import toolkit.captioner

    exc, want_code, message, hint = FAULTS[fault]
    monkeypatch.setattr(toolkit.captioner, "caption_images", raising(exc))
    argv = ["caption", tiny_dataset["images"], "--lang", "en", "--packs-dir", tmp_path]
    code, out, err = capkit(monkeypatch, capsys, *argv)
    assert code == want_code
    one_error(err, message, hint)

    monkeypatch.setattr(sys, "argv", ["capkit", "--debug", *map(str, argv)])
    with pytest.raises(type(exc)):
        main()


# -- the installed script itself -------------------------------------------------------


def run_capkit(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    return subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_script_exit_code_and_stderr(tmp_path):
    # Fails before TensorFlow is imported: a fast subprocess.
    p = run_capkit("caption", tmp_path, "--lang", "en", "--beam", "0", "--packs-dir", tmp_path)
    assert p.returncode == 2
    assert p.stderr == "error: --beam must be at least 1, not 0\n"
    assert p.stdout == ""

    p = run_capkit("--debug", "caption", tmp_path, "--lang", "en", "--beam", "0", "--packs-dir", tmp_path)
    assert p.returncode != 0
    assert "Traceback" in p.stderr and "CapkitError: --beam must be at least 1" in p.stderr


TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} ", re.M)  # absl's prefix: level, month, day


RETRACING = """
from toolkit.backend import import_tensorflow
tf = import_tensorflow()
f = tf.function(lambda x: x * 2)
for n in range(1, 9):  # a new shape each call: TensorFlow warns of retracing from the sixth trace
    f(tf.zeros([n]))
"""


def test_tensorflow_python_warnings_are_silenced_unless_asked_for():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CAPKIT_TF_VERBOSE")}
    quiet = subprocess.run([sys.executable, "-c", RETRACING], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    loud = subprocess.run([sys.executable, "-c", RETRACING], cwd=REPO, env={**env, "CAPKIT_TF_VERBOSE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "retracing" in loud.stderr and "retracing" not in quiet.stderr, quiet.stderr


@pytest.mark.parametrize("precision", ["auto", "bfloat16"])
def test_training_and_captioning_print_no_tensorflow_log_lines(tiny_dataset, tmp_path, precision):
    """Run as a user would (no TF_CPP_MIN_LOG_LEVEL): only capkit's own lines; CAPKIT_TF_VERBOSE=1 shows TF's.

    In bfloat16 too, whose every stage (extraction, teacher forcing, self-critical steps) runs other kernels.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CAPKIT_TF_VERBOSE")}
    d, packs = tiny_dataset, tmp_path / "packs"
    build = ["build-pack", "en", "--captions", d["captions_en"], "--images", d["images"], "--train-split", d["train"],
             "--dev-split", d["dev"], "--encoder-weights", "none", "--image-size", "71", "--epochs", "1",
             "--self-critical-epochs", "1", "--precision", precision, "--packs-dir", packs]
    for args in (build, ["caption", d["images"], "--lang", "en", "--packs-dir", packs]):
        p = subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert not TF_LOG_LINE.search(p.stderr) and "Warning:" not in p.stderr, p.stderr  # nor Python warnings
    manifest = json.loads((packs / "en" / "manifest.json").read_text())
    assert manifest["train"]["precision"] == {"auto": "float32", "bfloat16": "bfloat16"}[precision]  # as trained
    if precision == "bfloat16":  # the model card says so; TensorFlow's own lines are checked once, below
        assert ", in mixed bfloat16" in (packs / "en" / "README.md").read_text()
        return
    p = subprocess.run([sys.executable, "-m", "toolkit", "caption", str(d["images"]), "--lang", "en", "--packs-dir", str(packs)],
                       cwd=REPO, env={**env, "CAPKIT_TF_VERBOSE": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and TF_LOG_LINE.search(p.stderr)
