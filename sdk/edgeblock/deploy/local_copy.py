"""Copying the bundle into a directory on this machine: a file whose sha256 already matches is skipped, the
others go through FILE.part (resumed when an interrupted copy left one), are checked, fsynced and renamed.
"""

from __future__ import annotations

import os

from edge_runtime.fileio import fsync_dir, sha256_file
from edge_runtime.manifest import MANIFEST

from .options import DeployError, DeployResult
from .target import Target

CHUNK = 4 << 20


def check_local_dest(bundle: str, target: Target, expected: dict[str, str]) -> None:
    """Refuse a target directory that overlaps the bundle, is a file, or holds files not of a bundle."""
    src, dst = os.path.realpath(bundle), os.path.realpath(target.path)
    if src == dst or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise ValueError(f"--host {target}: the target and the bundle {bundle} overlap; give another directory")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"--host {target}: {dst} exists and is not a directory")
    if os.path.isdir(dst):
        # An empty directory, an earlier bundle or an interrupted copy of this one; never someone's home.
        ours = {rel.split("/", 1)[0] for rel in expected} | {"engines"}
        other = sorted(n for n in os.listdir(dst) if n.split(".part")[0] not in ours)
        if other and not os.path.exists(os.path.join(dst, MANIFEST)):
            raise ValueError(f"--host {target}: {dst} holds files that are not part of a bundle "
                             f"({', '.join(other[:5])}); give an empty directory or an earlier bundle's")


def already_there(target: Target, files: list[str], expected: dict[str, str]) -> list[str]:
    """The files the target directory already holds with the manifest's sha256 (the dry run's count)."""
    return [r for r in files if os.path.isfile(os.path.join(target.path, *r.split("/")))
            and sha256_file(os.path.join(target.path, *r.split("/"))) == expected[r]]


def _copy_file_local(src: str, dst: str, want: str, bar) -> int:
    """Copy src to dst through dst.part (resumed when a shorter .part is there), checked against `want`,
    fsynced and renamed. Returns the bytes kept from an earlier .part."""
    part = dst + ".part"
    size = os.path.getsize(src)
    for attempt in (0, 1):
        kept = os.path.getsize(part) if attempt == 0 and os.path.isfile(part) else 0
        if kept > size:
            kept = 0
        bar.update(kept)
        with open(src, "rb") as fi, open(part, "r+b" if kept else "wb") as fo:
            fi.seek(kept)
            fo.seek(kept)
            fo.truncate()
            while block := fi.read(CHUNK):
                fo.write(block)
                bar.update(len(block))
            fo.flush()
            os.fsync(fo.fileno())
        if sha256_file(part) == want:
            os.chmod(part, 0o644)  # as rsync's TARGET_MODES: readable by the service user
            os.replace(part, dst)
            return kept
        bar.update(-size)  # the kept part was not a prefix of this file: copy it whole once more
    os.unlink(part)
    raise DeployError(f"copy: {dst} does not match the manifest's sha256 after copying: the source changed "
                      "while copying, or the target's storage is failing")


def copy_local(bundle: str, target: Target, files: list[str], expected: dict[str, str], sizes: dict[str, int],
               result: DeployResult, force: bool, progress: bool) -> list[str]:
    """Copy `files` (manifest.json last) into the local target; without force, a file whose sha256 already
    matches is skipped. Returns the files written."""
    from tqdm import tqdm

    todo = []
    for rel in files:
        dst = os.path.join(target.path, *rel.split("/"))
        if not force and os.path.isfile(dst) and os.path.getsize(dst) == sizes[rel] and sha256_file(dst) == expected[rel]:
            continue
        todo.append(rel)
    todo.sort(key=lambda r: r == MANIFEST)  # the manifest last: an interrupted copy never looks complete
    written = []
    with tqdm(total=sum(sizes[r] for r in todo), desc="copy", unit="B", unit_scale=True, unit_divisor=1024,
              disable=not progress or not todo, dynamic_ncols=True) as bar:
        for rel in todo:
            dst = os.path.join(target.path, *rel.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            kept = _copy_file_local(os.path.join(bundle, *rel.split("/")), dst, expected[rel], bar)
            if kept:
                result.resumed[rel] = kept
            written.append(rel)
    for d in {os.path.dirname(os.path.join(target.path, *r.split("/"))) for r in written}:
        fsync_dir(d)  # the renames survive a power cut
    return written
