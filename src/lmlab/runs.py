"""Output paths: the run folder, atomic writes, and the checks every writing command makes first.

    RUN/
      config.yaml            the resolved config the run was started with
      metrics.jsonl          one JSON object per logged step or evaluation
      plots/                 loss.png, val_loss_time.png (and a task's own plots)
      tensorboard/           with train.tensorboard
      checkpoints/step-N/    model.safetensors, tokenizer.json, state.pt, manifest.json (train/checkpoint.py)

Every file lmlab writes goes through a temporary file or folder and a rename, so a crash or Ctrl-C
never leaves a half-written file where a complete one is expected. The temporaries are named
``.NAME.tmp-PID`` (a folder), ``.NAME.XXXXXXXX.tmp-PID`` (a file), ``.NAME.old-PID`` (the previous
NAME during a replacement) and ``.NAME.replaced-PID`` (a run that a --force run replaces, until the new
one saves its first checkpoint). A process that is killed leaves them behind; the next command writing
NAME removes them, or puts the previous NAME back when the kill came mid-replacement (``.old-PID``
without NAME) or before the replacing run's first checkpoint (``.replaced-PID``).

Before any work, a writing command calls ``check_output``: it never writes over one of its own
inputs, never into a folder holding something lmlab did not write, replaces a previous output of the
same kind only with ``--force``, and fails at once when the place cannot be written.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from lmlab.errors import DataError, LmlabError, OutputError

log = logging.getLogger(__name__)

_UMASK = os.umask(0o022)  # read once, at import: os.umask can only be read by setting it
os.umask(_UMASK)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<how>tmp|old|replaced)-(?P<pid>\d+)$")  # what a killed process leaves

KINDS = {  # the outputs lmlab writes, as messages name them
    "run": "an lmlab run",
    "checkpoint": "an lmlab checkpoint",
    "hf": "a Hugging Face folder",
    "data": "a prepared data folder",
    "demo": "a demo folder",
    "report": "an evaluation report",
    "tokenizer": "a tokenizer file",
    "gguf": "a GGUF file",
}
_FILE_KINDS = ("tokenizer", "gguf")  # the kinds that are one file, not a folder


class RunFolder:
    """The paths of one run folder (nothing is created until something is written)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> "RunFolder":
        """The run a checkpoint folder (``RUN/checkpoints/step-N``) belongs to."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint at ``step``."""
        return self.checkpoints_dir / f"step-{step:06d}"

    def checkpoints(self) -> list[Path]:
        """The step-N checkpoint folders of the run, oldest first."""
        folder = self.checkpoints_dir
        if not folder.is_dir():
            return []
        steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(steps)]

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoints (``keep`` <= 0 keeps them all)."""
        for old in self.checkpoints()[:-keep] if keep > 0 else []:
            doomed = old.with_name(f".{old.name}.tmp-{os.getpid()}")  # a kill mid-delete leaves a temporary,
            os.replace(old, doomed)  # removed at the next start, never a half-deleted step-N
            shutil.rmtree(doomed)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporaries that killed processes left in the run (``.step-N.tmp-PID``, ...)."""
        return [p for folder in (self.root, self.checkpoints_dir) for p in remove_stale_temporaries(folder)]


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The step-N checkpoint folders of a run, oldest first."""
    return RunFolder(run_dir).checkpoints()


# ---------------------------------------------------------------------------------------------
# what an existing output holds


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind (a key of KINDS) of lmlab output at ``path``, or None for anything else (or nothing).

    A folder is recognised by its marker files, the most specific first: a run (config.yaml with
    checkpoints/ or metrics.jsonl), a checkpoint (manifest.json of format lmlab-checkpoint), a Hugging
    Face folder (config.json with model.safetensors or pytorch_model.bin), prepared data (meta.json of
    format lmlab-tokens, or lmlab-pairs for parallel text), a demo folder (data/ and run/ only), a
    report (an evaluation's results.json and results.md, or data prepare's filter report.json and
    report.md). A file is a GGUF file (llama.cpp) when it starts with
    "GGUF", a tokenizer when it is a tokenizers JSON (a "model" key). A place that cannot be read is None.
    """
    try:
        return _output_kind(Path(path))
    except OSError:
        return None


def _output_kind(path: Path) -> str | None:
    if path.is_file():
        if _is_gguf_file(path):
            return "gguf"
        return "tokenizer" if _is_tokenizer_file(path) else None
    if not path.is_dir():
        return None
    names = _entries(path)
    if (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file()
                                             or names == {"config.yaml"}):
        return "run"
    if _json_object(path / "manifest.json").get("format") == "lmlab-checkpoint":
        return "checkpoint"
    if (path / "config.json").is_file() and any((path / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        return "hf"
    if _json_object(path / "meta.json").get("format") in ("lmlab-tokens", "lmlab-pairs"):  # data/prepare.py, pairs.py
        return "data"
    if names and names <= {"data", "run"} and all(output_kind(path / n) == n for n in names):
        return "demo"
    if any((path / f"{n}.md").is_file() and _json_object(path / f"{n}.json") for n in ("results", "report")):
        return "report"  # an evaluation's results.*, data prepare's filter report.*
    return None


def _entries(folder: Path) -> set[str]:
    """The names in ``folder``, lmlab's temporaries left out."""
    return {p.name for p in folder.iterdir() if not _TEMPORARY.match(p.name)}


def _is_empty(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but lmlab's temporaries and empty folders."""
    return all(p.is_dir() and not p.is_symlink() and _is_empty(p)
               for p in folder.iterdir() if not _TEMPORARY.match(p.name))


def _json_object(path: Path, limit: int = 1 << 20) -> dict:
    """The JSON object in file ``path`` ({} if it is missing, larger than ``limit`` bytes, or not a JSON object)."""
    try:
        if not path.is_file() or path.stat().st_size > limit:
            return {}
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_gguf_file(path: Path) -> bool:
    """Whether ``path`` starts with the GGUF magic (llama.cpp's model files)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _is_tokenizer_file(path: Path) -> bool:
    """Whether ``path`` is a tokenizers JSON file (it starts with "{" and has a "model" key)."""
    try:
        with open(path, "rb") as f:
            if f.read(64).lstrip()[:1] != b"{":
                return False
    except OSError:
        return False
    return "model" in _json_object(path, limit=1 << 30)


# ---------------------------------------------------------------------------------------------
# the check every writing command makes before any work


def check_output(path: str | os.PathLike, kind: str, inputs: Iterable = (), force: bool = False) -> Path:
    """Refuse an output that would lose data or mix files, before any work; return the path to write.

    ``kind`` (a key of KINDS) is what the command writes; ``inputs`` are the paths it reads (files,
    folders, globs; None and names that are no path are skipped). Refused, as an OutputError that
    names the path: an output that is, contains or lies inside an input; one inside another finished
    output (a checkpoint, Hugging Face folder, prepared data, report); a file where a folder is
    expected or the other way round; a non-empty folder (or a file) that does not hold a previous
    output of the same kind; such a previous output unless ``force``; a place whose parent cannot be
    created or written. Stale temporaries of the output (see the module docstring) are removed first.
    A tokenizer is a file: an existing folder is refused (adding tokenizer.json to a run or a user's
    folder would mix outputs).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = Path(path)
    if kind == "tokenizer" and path.is_dir():
        raise OutputError(f"{path} is a folder; give the path of the tokenizer file to write, e.g. "
                          f"{path / 'tokenizer.json'} (a file of its own, not a file added to a folder)")
    check_place(path, inputs)
    if kind == "run":
        RunFolder(path).remove_stale_temporaries()
    _check_existing(path, kind, force)
    return path


def check_place(path: str | os.PathLike, inputs: Iterable = ()) -> Path:
    """The part of ``check_output`` about where ``path`` is, not what it holds; return the path to write.

    Refused, as an OutputError: an output that is, contains or lies inside one of ``inputs``; one inside
    a finished output; a place whose parent cannot be created or written. Stale temporaries of the
    output are removed first. (A page or a picture that lmlab rewrites at will checks what it replaces
    first: check_page_output.)
    """
    path = Path(path)
    _check_not_an_input(path, inputs)
    _check_not_inside_an_output(path)
    remove_stale_temporaries(path.parent, path.name)
    _check_writable(path)
    return path


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_page_output(path: str | os.PathLike, suffix: str, mark: str | None = None,
                      page_kind: str = "a page written by lmlab") -> Path:
    """``path`` if a page or picture (``suffix``: .html, .png) may be written there: not a folder, named with
    ``suffix``, and not an existing file of another kind: an existing PNG is replaced (as plotting tools
    do), an existing page only if it holds ``mark`` (``page_kind``: written by the same command); anything
    else is the user's and refused. Then the checks of its place that every output gets (check_place). The
    rule of check_output for lmlab's output folders (refuse, or --force) does not fit a page rewritten at will."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give the name of the {suffix} file to write")
    if path.suffix.lower() != suffix:
        raise OutputError(f"{path} does not end in {suffix}")
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4000)
        ours = head.startswith(PNG_SIGNATURE) if suffix == ".png" else mark is not None and mark.encode() in head
        if not ours:
            kind = "a PNG picture" if suffix == ".png" else page_kind
            raise OutputError(f"{path} exists and is not {kind}; refusing to replace it")
    return check_place(path)


def _check_not_an_input(path: Path, inputs: Iterable) -> None:
    """Refuse ``path`` if it is one of ``inputs``, contains one, or lies inside one (resolved paths)."""
    out = path.resolve()
    for item in inputs:
        for source in _input_paths(item):
            src = source.resolve()
            if out == src:
                raise OutputError(f"{path} is also an input of this command; write the output to another path")
            if out in src.parents:
                raise OutputError(f"{path} contains the input {source}; write the output to another path")
            if src in out.parents:
                raise OutputError(f"{path} is inside the input {source}; write the output outside the inputs")


def _check_not_inside_an_output(path: Path) -> None:
    """Refuse ``path`` inside a finished lmlab output (a checkpoint, a Hugging Face folder, prepared
    data, a report, a run's checkpoints/): writing there would change what that output holds. A run
    or demo folder may hold further outputs (RUN/eval)."""
    for parent in path.resolve().parents:
        kind = output_kind(parent)
        if kind in ("checkpoint", "hf", "data", "report") or (parent.name == "checkpoints"
                                                              and output_kind(parent.parent) == "run"):
            what = KINDS[kind] if kind else "the checkpoints of a run"
            raise OutputError(f"{path} is inside {parent}, which holds {what}; write the output elsewhere")


def _input_paths(item) -> list[Path]:
    """The existing paths an input names: a glob's matches, or the path itself if it exists."""
    if item is None or str(item) == "":
        return []
    text = str(item)
    if any(c in text for c in "*?["):
        return [Path(p) for p in glob.glob(text, recursive=True)]
    return [Path(text)] if os.path.lexists(text) else []


def _check_existing(path: Path, kind: str, force: bool) -> None:
    """Refuse what is already at ``path`` unless it is empty, or a previous ``kind`` output and ``force``."""
    if not os.path.lexists(path):
        return
    folder = kind not in _FILE_KINDS
    if folder != path.is_dir():
        raise OutputError(f"{path} is a file, not a folder; give a new or empty folder" if folder
                          else f"{path} is a folder, not a file; give a file path")
    if folder and _is_empty(path):
        return
    found = output_kind(path)
    if found != kind:
        held = f"holds {KINDS[found]}" if found else "holds files lmlab did not write"
        raise OutputError(f"{path} {held if folder else 'is not ' + KINDS[kind]}; refusing to replace it "
                          f"(--force replaces only {KINDS[kind]}); choose another output")
    if not force:
        raise OutputError(f"{path} already holds {KINDS[kind]}; pass --force to replace it, or choose another output")


def _check_writable(path: Path) -> None:
    """Refuse ``path`` if its parent folders cannot be created or a file cannot be written in them
    (or in ``path`` itself, an existing folder). Folders made for the probe are removed again."""
    try:
        created = _make_dirs(path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: cannot create {e.filename or path.parent} ({e.strerror})") from None
    try:
        for folder in [path.parent] + ([path] if path.is_dir() else []):
            _probe(path, folder)
    finally:
        _remove_empty(created)


def _probe(path: Path, folder: Path) -> None:
    """Create and delete a temporary file in ``folder``; an OutputError about ``path`` if that fails."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lmlab-probe.", suffix=f".tmp-{os.getpid()}")
    except OSError as e:
        raise OutputError(f"cannot write {path}: cannot write in {folder} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the folders created, deepest first.

    A parent that exists as a file is reported as an OutputError."""
    missing = []
    p = folder
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise OutputError(f"cannot create {folder}: {p} is a file, not a folder")
    created = []
    try:
        for p in reversed(missing):
            p.mkdir()
            created.insert(0, p)
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


# ---------------------------------------------------------------------------------------------
# temporaries of killed processes


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporaries in ``folder`` that processes no longer running left behind (of output
    ``name`` only, if given), logging each; a ``.NAME.old-PID`` whose NAME is missing (a replacement
    was killed halfway) is renamed back to NAME instead. Returns the paths removed or restored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for p in sorted(folder.iterdir()):
        m = _TEMPORARY.match(p.name)
        if not m or (name is not None and not p.name.startswith(f".{name}.")) or _process_alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["how"] == "replaced":  # the replacing run never saved a checkpoint: it goes, the old one comes back
            _remove(target)
        if m["how"] in ("old", "replaced") and not os.path.lexists(target):
            os.replace(p, target)
            log.info("restored %s from %s, left by an interrupted replacement", target, p)
        else:
            _remove(p)
            log.info("removed stale temporary %s", p)
        done.append(p)
    return done


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree at ``path`` (a link is removed, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# writing


def read_text_file(path: str | os.PathLike, what: str, error: type[LmlabError] = DataError) -> str:
    """The whole UTF-8 text of a small file the user names (``what``: "config", "prompt" ...), or one ``error``
    line saying why not: an empty name, a folder, missing, binary (NUL bytes) or not UTF-8."""
    article = "an" if what[:1].lower() in "aeiou" else "a"
    if not str(path).strip():  # before Path(), which reads "" as "."
        raise error(f"the {what} file name is empty")
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a folder, not {article} {what} file")
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise error(f"{path}: a binary file, not {article} {what} file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the path of an empty temporary file beside ``path`` for the caller to write (a library that
    writes files by name); on success it replaces ``path``. A failure inside the block deletes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp-{os.getpid()}")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # what open() would give: mkstemp makes it private (0600)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` whole.

    A failure (or Ctrl-C) inside the block, or in the replacement, deletes the temporary folder (and
    the parent folders it made) and leaves ``path`` as it was. A file at ``path`` is never replaced.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"{path} is a file, not a folder; refusing to replace it")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    created = _make_dirs(path.parent)
    try:
        tmp.mkdir()
        yield tmp
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename folder ``tmp`` to ``path``; a previous ``path`` is moved aside first, put back if the
    rename fails, and deleted after it succeeds."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


class OutputClaim:
    """A folder a command is filling in place (a training run), made or emptied by ``claim_output``.

    Until ``keep()`` (the run's first checkpoint) the folder is provisional: if the command fails,
    what it wrote is removed and a previous output it replaced is put back.
    """

    def __init__(self, path: Path, replace: bool):
        self.path, self.kept, self.previous = path, False, None
        self.existed = os.path.lexists(path)
        if replace and self.existed and not _is_empty(path):
            self.previous = path.with_name(f".{path.name}.replaced-{os.getpid()}")
            os.replace(path, self.previous)
            log.info("moved the previous %s aside; it is deleted once the new run saves a checkpoint", path)
            self.existed = False
        self.provisional = not self.existed or _is_empty(path)  # nothing of value in it yet
        self.created = _make_dirs(path)

    def keep(self) -> None:
        """The output now holds something of value: keep it, and delete the output it replaced."""
        if self.previous is not None:
            doomed = self.previous.with_name(f".{self.path.name}.old-{os.getpid()}")  # a kill from here on
            os.replace(self.previous, doomed)  # leaves a stale .old-PID beside the new run: deleted, not restored
            shutil.rmtree(doomed, ignore_errors=True)
            log.info("removed the previous %s", self.path)
            self.previous = None
        self.kept = True

    def abandon(self) -> None:
        """Remove what was written since the claim (if nothing was kept) and restore a replaced output."""
        if self.kept or not self.provisional:
            return
        if self.existed:  # an empty folder the user made: empty it again
            for p in self.path.iterdir():
                _remove(p)
        else:
            shutil.rmtree(self.path, ignore_errors=True)
            _remove_empty(self.created[1:])
        log.info("removed the unfinished output %s", self.path)
        if self.previous is not None:
            os.replace(self.previous, self.path)
            log.info("restored the previous %s", self.path)


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, replace: bool = False) -> Iterator[OutputClaim]:
    """Make (or, with ``replace``, take over) folder ``path`` for a command that writes into it in
    place; see OutputClaim. Leaving the block normally keeps the folder; an exception abandons it."""
    claim = OutputClaim(Path(path), replace)
    try:
        yield claim
    except BaseException:
        claim.abandon()
        raise
    claim.keep()
