"""Atomic checkpoint directories: at every instant the target holds a complete checkpoint, the old one or
the new one, and a save touches only files that llama4 saves wrote.

A save is a set of files, `{relative name: bytes or writer(file object)}` (`write_checkpoint`). `llama4.save`
passes config.json, the safetensors shards, the index and expert_bias.json; the trainer adds the tokenizer
and its training state; more files (tokenizer_config.json, chat template, generation_config.json, ...) plug
in the same way through `llama4.save(..., extra_files=...)`.

- A new target is assembled in a hidden staging directory beside it (`.NAME.llama4-saving-PID-ID`), flushed
  and renamed into place in one step: the target is absent or complete.
- An existing target is updated in place by a small transaction recorded in its manifest,
  `.llama4-save.json`:
  1. the manifest lists the temporary names about to be written (`pending`), so that the leftovers of a
     killed save are known to be ours and the next save removes them;
  2. every file is written under a temporary name (`.NAME.llama4-tmp-ID`) and fsynced; old files are untouched;
  3. commit: the manifest is replaced, in one atomic rename, by one that records the renames and deletions
     still to do (`commit`);
  4. the temporaries are renamed over their final names (shards first, the index and config.json last) and
     files of earlier saves that this one supersedes (old shards, an index, a bias file) are deleted;
  5. the manifest drops the journal.
  A reader that goes through `Snapshot` (`llama4.load`, `--resume`) sees the old set until step 3 and the
  new set from then on (a temporary stands in for its final name until renamed). Readers of final names
  (transformers) see a mixed set only during the few renames of step 4. The next save finishes a
  committed transaction that was killed (roll forward) and deletes the leftovers of one that was not.
- Ownership: the manifest lists every file llama4 saves wrote there. A save refuses to replace a file it
  did not write, and refuses a directory holding *.safetensors or *.index.json files it did not write (they
  would be mistaken for, or mixed with, its weights); nothing else in the directory is ever moved or deleted.
- A symlinked target is followed: files go into the directory it points at. Directories get the usual
  permissions (the umask's). One save at a time per directory.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import BinaryIO

log = logging.getLogger("llama4")
FileData = bytes | Callable[[BinaryIO], None]
MANIFEST = ".llama4-save.json"
_TMP = ".llama4-tmp-"
_WEIGHTS = re.compile(r".*\.safetensors(\.index\.json)?")

# Called after every rename, replace and delete a save makes, with (operation, path). Tests set it to stop
# a save right after each step; None in normal use.
rename_hook: Callable[[str, Path], None] | None = None


def write_checkpoint(target: str | os.PathLike, files: Mapping[str, FileData],
                     supersedes: Callable[[str], bool] = lambda name: True) -> Path:
    """Write `files` as the checkpoint in directory `target`, replacing the files of earlier llama4 saves
    there, and leaving every other file alone. Files of earlier saves that this one does not write are
    deleted where `supersedes(name)` (stale shards, an index, a bias file) and kept otherwise."""
    names = [_check_name(n) for n in files]
    root = Path(os.path.realpath(target))  # a symlinked target: write where it points
    if root.exists() and not root.is_dir():
        raise ValueError(f"{target}: exists and is not a directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(root)
    if not root.exists():
        _write_fresh(root, files)
    else:
        _write_in_place(root, files, names, supersedes)
    return root


def clean_leftovers(root: Path) -> None:
    """Remove what killed saves left: staging directories beside `root`, temporaries inside it (only
    files our manifests list), and finish a committed transaction."""
    pattern = re.compile(rf"\.{re.escape(root.name)}\.llama4-(saving|trash)-(\d+)-[0-9a-f]+")
    legacy = re.compile(rf"\.{re.escape(root.name)}\.(saving-\w{{8}}|old-\d+)")
    if root.parent.is_dir():
        for p in root.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and p.is_dir() and not _alive(int(m.group(2))):
                remove_tree(p)
            elif legacy.fullmatch(p.name) and p.is_dir():
                log.warning("%s: left by a save of an older llama4 that was interrupted; not removed, as it may "
                            "hold your own files (tokenizer, notes): move back what you need, then delete it", p)
    if root.is_dir():
        _drop_manifest_temps(root)
        man = _read_manifest(root)
        if man is not None:
            _finish(root, man)


def remove_checkpoint(d: Path) -> None:
    """Delete checkpoint directory `d` as `remove_tree` does, after renaming it out of sight in one step
    (a kill part way leaves a hidden leftover that the next save beside it removes, never a torn `d`)."""
    trash = d.parent / f".{d.name}.llama4-trash-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(d, trash)
    _step("rename", trash)
    remove_tree(trash)


def remove_tree(d: Path) -> None:
    """Delete a directory our saves wrote: the files its manifest lists (and temporaries of ours), then the
    directories left empty. Anything else stays, and so does the directory holding it."""
    man = _read_manifest(d) or {"files": [], "pending": []}
    for name in man["files"] + man["pending"]:
        _unlink(d / name)
    _drop_manifest_temps(d)
    _unlink(d / MANIFEST)
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rmdir(sub)
    _rmdir(d)


class Snapshot:
    """The checkpoint in `root` as a consistent set of files: where a committed save is still renaming its
    temporaries, the new set (temporaries stand in for their final names; files it deletes are absent)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        man = _read_manifest(self.root, strict=False) if self.root.is_dir() else None
        commit = man["commit"] if man else None
        self.stand_in = {final: self.root / tmp for tmp, final in (commit or {}).get("rename", [])
                         if (self.root / tmp).is_file()}
        self.deleted = set((commit or {}).get("delete", []))

    def file(self, name: str) -> Path | None:
        """The path that holds `name` in this set, or None."""
        if name in self.stand_in:
            return self.stand_in[name]
        if name in self.deleted:
            return None
        p = self.root / name
        return p if p.is_file() else None

    def names(self, pattern: str) -> list[str]:
        """Top-level names in the set matching a glob `pattern` (temporaries and hidden files excluded)."""
        found = {p.name for p in self.root.glob(pattern) if not p.name.startswith(".") and p.is_file()}
        found |= {n for n in self.stand_in if PurePosixPath(n).match(pattern) and "/" not in n}
        return sorted(found - (self.deleted - set(self.stand_in)))


# Writing ------------------------------------------------------------------------------------------------

def _write_fresh(root: Path, files: Mapping[str, FileData]) -> None:
    staging = root.parent / f".{root.name}.llama4-saving-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        _write_manifest(staging, {"files": [], "pending": sorted(files), "commit": None})
        for name, data in files.items():
            _write_file(staging / name, data, root, name)
        _write_manifest(staging, {"files": sorted(files), "pending": [], "commit": None})
        _fsync_dir(staging)
        os.rename(staging, root)
        _step("rename", root)
        _fsync_dir(root.parent)
    except BaseException:
        if staging.exists():
            remove_tree(staging)
        raise


def _write_in_place(root: Path, files: Mapping[str, FileData], names: list[str],
                    supersedes: Callable[[str], bool]) -> None:
    man = _read_manifest(root) or {"files": [], "pending": [], "commit": None}
    owned = set(man["files"])
    foreign = sorted(n for n in names if (root / n).exists() and n not in owned)
    foreign += sorted(p.name for p in root.iterdir()
                      if _WEIGHTS.fullmatch(p.name) and p.name not in owned and p.name not in foreign)
    if foreign:
        raise ValueError(f"{root}: will not save over {foreign}: llama4.save did not write them (no entry in "
                         f"{MANIFEST}), and replacing them or mixing them with new weights could lose data; "
                         f"save to a new directory, or move them away first")
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    temps = {n: _tmp_name(n, tag) for n in names}
    man = {"files": sorted(owned), "pending": sorted(temps.values()), "commit": None}
    _write_manifest(root, man)
    try:
        for n in names:
            _write_file(root / temps[n], files[n], root, n)
    except BaseException:
        try:  # best effort: on a full disk even this may fail, and the next save cleans up
            for t in temps.values():
                _unlink(root / t, hook=False)
            _write_manifest(root, {**man, "pending": []})
        except OSError:
            pass
        raise
    # Shards first, config.json last: readers of final names get the new weights before the new config.
    order = sorted(names, key=lambda n: (n == "config.json", n.endswith(".index.json"),
                                         not n.endswith(".safetensors"), n))
    delete = sorted(n for n in owned - set(names) if supersedes(n))
    commit = {"rename": [[temps[n], n] for n in order], "delete": delete}
    # The commit point: from this replace on, readers see the new set.
    _write_manifest(root, {"files": sorted(owned - set(delete) | set(names)), "pending": [], "commit": commit})
    _finish(root, _read_manifest(root))


def _finish(root: Path, man: dict) -> None:
    """Roll a committed transaction forward; delete the temporaries of one that never committed."""
    for name in man["pending"]:
        _unlink(root / name)
    commit = man["commit"]
    if commit:
        for tmp, final in commit["rename"]:
            if (root / tmp).exists():
                (root / final).parent.mkdir(parents=True, exist_ok=True)
                os.replace(root / tmp, root / final)
                _step("replace", root / final)
        for name in commit["delete"]:
            _unlink(root / name)
            if "/" in name:
                _rmdir((root / name).parent)
        _fsync_dir(root)
    if commit or man["pending"]:
        _write_manifest(root, {"files": man["files"], "pending": [], "commit": None})


def _write_file(path: Path, data: FileData, root: Path, name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"{root}: disk full ({errno.errorcode[e.errno]}: {os.strerror(e.errno)}) "
                                   f"while writing {name}; the checkpoint there is unchanged") from None
        raise


def _write_manifest(d: Path, man: dict) -> None:
    tmp = d / f"{MANIFEST}{_TMP}{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"llama4_save": 1, **man}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / MANIFEST)
    _fsync_dir(d)
    _step("replace", d / MANIFEST)


def _read_manifest(d: Path, strict: bool = True) -> dict | None:
    """The manifest of directory `d` (None if there is none). A damaged one is an error when saving (we
    cannot tell our files from others') and ignored when reading."""
    f = d / MANIFEST
    if not f.is_file():
        return None
    try:
        man = json.loads(f.read_text())
        ok = _valid_manifest(d, man)
    except (OSError, ValueError, UnicodeDecodeError):
        ok = False
    if ok:
        return man
    if strict:
        raise ValueError(f"{f}: damaged manifest of llama4 saves; without it the files there cannot be told "
                         f"apart from others', so nothing is replaced. Save to a new directory")
    return None


def _valid_manifest(d: Path, man) -> bool:
    """Well formed, and naming only files inside `d` (no `..`, no absolute paths, no subdirectory that is a
    symlink out of it) with renames only from a temporary to its own final name: a manifest planted in a
    shared directory can neither make a save touch files elsewhere nor make a load read them."""
    if not (isinstance(man, dict) and man.get("llama4_save") == 1 and
            all(isinstance(man.get(k), list) and all(isinstance(x, str) for x in man[k]) for k in ("files", "pending"))):
        return False
    commit = man.get("commit")
    if commit is not None:
        if not (isinstance(commit, dict) and isinstance(commit.get("delete"), list) and
                isinstance(commit.get("rename"), list) and
                all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in commit["rename"])
                and all(isinstance(x, str) for x in commit["delete"])):
            return False
        for tmp, final in commit["rename"]:
            t, f = PurePosixPath(tmp), PurePosixPath(final)
            if t.parent != f.parent or not t.name.startswith(f".{f.name}{_TMP}"):
                return False
    names = man["files"] + man["pending"] + (commit["delete"] + [x for p in commit["rename"] for x in p] if commit
                                             else [])
    base = os.path.realpath(d)
    for name in names:
        _check_name(name)
        parent = os.path.realpath(os.path.join(d, os.path.dirname(name)))
        if parent != base and not parent.startswith(base + os.sep):
            return False
    return True


# Small helpers --------------------------------------------------------------------------------------------

def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or \
            any(x in ("..", ".", "") for x in name.split("/")):
        raise ValueError(f"checkpoint file name {name!r}: expected a relative path inside the directory")
    return name


def _drop_manifest_temps(d: Path) -> None:
    for p in d.iterdir():  # a manifest write that was killed
        if p.name.startswith(MANIFEST + _TMP):
            _unlink(p, hook=False)


def _tmp_name(name: str, tag: str) -> str:
    p = PurePosixPath(name)
    return str(p.with_name(f".{p.name}{_TMP}{tag}"))


def _step(op: str, path: Path) -> None:
    if rename_hook is not None:
        rename_hook(op, path)


def _unlink(p: Path, hook: bool = True) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        return
    if hook:
        _step("delete", p)


def _rmdir(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:  # not empty: it holds something we did not write
        pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
