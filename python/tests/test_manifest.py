"""Manifests, verify and backup chains through the Python binding (cowbackup_verify,
cowbackup_chain_open): a full backup and an incremental under a writer, restored through
the chain; a flipped byte named by verify and refused by verify-on-read; broken chains."""

from __future__ import annotations

import errno
import os
import random
import stat

import pytest

import cowbackup
from cowbackup import Bitmap, Corrupt, Driver, InvalidArgument

KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB
SIZE = 2 * MiB


def _read_all(d: Driver) -> bytes:
    return bytes(d.read(0, d.size))


def _backup(tmp_path, src: Driver, bm: Bitmap, n: int, rng: random.Random) -> str:
    target = Driver.create(str(tmp_path / f"b{n}.img"), SIZE)
    mp = str(tmp_path / f"b{n}.manifest")
    job = cowbackup.backup_start(src, target, sync="full" if n == 0 else "bitmap", bitmap=bm,
                                 manifest=mp, disk_id="py-disk")
    for _ in range(16):  # the host's writes during the job: hook, write, mark
        off = rng.randrange(0, SIZE // 4096 - 4) * 4096
        job.cow_before_write(off, 8192)
        src.write(off, os.urandom(8192))
        bm.mark(off, 8192)
    job.wait()
    target.close()
    return mp


def test_chain_restore_verify_and_corruption(tmp_path):
    rng = random.Random(5)
    src_path = tmp_path / "src.img"
    src_path.write_bytes(os.urandom(SIZE // 2) + bytes(SIZE // 2))
    src = Driver.open(str(src_path), write=True)
    bm = Bitmap.new(SIZE, CS)
    pits = []
    manifests = []
    for n in range(3):
        pits.append(_read_all(src))
        manifests.append(_backup(tmp_path, src, bm, n, rng))
        assert stat.S_IMODE(os.stat(manifests[-1]).st_mode) == 0o600
        chain = cowbackup.chain_open(manifests, verify=True)
        assert _read_all(chain) == pits[-1]
        # Restore: a backup job with the chain as the source.
        out = Driver.create(str(tmp_path / f"restore{n}.img"), SIZE)
        cowbackup.backup_start(chain, out).wait()
        assert _read_all(out) == pits[-1]
        out.close()
        chain.close()
    # Consolidate the full backup and the first incremental; the result replaces them.
    cowbackup.consolidate(manifests[:2], str(tmp_path / "c.img"), str(tmp_path / "c.manifest"))
    chain = cowbackup.chain_open([str(tmp_path / "c.manifest"), manifests[2]], verify=True)
    assert _read_all(chain) == pits[2]
    chain.close()
    with pytest.raises(FileExistsError):
        cowbackup.consolidate(manifests[:2], str(tmp_path / "c.img"), str(tmp_path / "c2.manifest"))
    full_target = Driver.open(str(tmp_path / "b0.img"), write=True)
    rep = cowbackup.verify(manifests[0], full_target)
    assert rep.clusters_checked == SIZE // CS and rep.mismatched_clusters == 0 and rep.mismatches == []
    # Flip one byte of a data cluster.
    b = full_target.read(3 * CS + 7, 1)
    full_target.write(3 * CS + 7, bytes([b[0] ^ 1]))
    with pytest.raises(Corrupt) as ei:
        cowbackup.verify(manifests[0], full_target)
    assert ei.value.errno == errno.EBADMSG
    assert ei.value.report.mismatches == [(3 * CS, CS)]
    rep = cowbackup.verify(manifests[0], full_target, raise_on_mismatch=False)
    assert rep.mismatched_clusters == 1
    chain = cowbackup.chain_open(manifests[:1], verify=True)
    with pytest.raises(Corrupt):
        chain.read(3 * CS, CS)
    assert bytes(chain.read(4 * CS, CS)) == pits[0][4 * CS:5 * CS]
    # Broken chains name the link.
    with pytest.raises(InvalidArgument, match="link 1"):
        cowbackup.chain_open([manifests[0], manifests[2]])
    with pytest.raises(InvalidArgument, match="link 0"):
        cowbackup.chain_open(manifests[1:])
    # A manifest is never written over an existing file.
    with pytest.raises(FileExistsError):
        cowbackup.backup_start(src, Driver.create(str(tmp_path / "x.img"), SIZE), manifest=manifests[0])
    # A bitmap of another disk.
    with pytest.raises(InvalidArgument, match="py-disk"):
        cowbackup.backup_start(src, Driver.create(str(tmp_path / "y.img"), SIZE), sync="bitmap", bitmap=bm,
                               disk_id="other-disk")


def test_chain_open_with_targets_given(tmp_path):
    """chain_open(targets=...): the backups' images moved away from their manifests (as for
    RBD images, devices, NBD exports the manifests cannot name), given as drivers."""
    rng = random.Random(9)
    src_path = tmp_path / "src.img"
    src_path.write_bytes(os.urandom(SIZE // 2) + bytes(SIZE // 2))
    src = Driver.open(str(src_path), write=True)
    bm = Bitmap.new(SIZE, CS)
    pits = []
    manifests = []
    for n in range(3):
        pits.append(_read_all(src))
        manifests.append(_backup(tmp_path, src, bm, n, rng))
    moved = tmp_path / "moved"
    moved.mkdir()
    for n in range(3):
        os.rename(tmp_path / f"b{n}.img", moved / f"b{n}.img")
    with pytest.raises(FileNotFoundError):
        cowbackup.chain_open(manifests)

    def targets():
        return [Driver.open(str(moved / f"b{n}.img")) for n in range(3)]

    for n in range(1, 4):
        ts = targets()
        chain = cowbackup.chain_open(manifests[:n], verify=True, targets=ts[:n])
        for t in ts:  # the chain keeps its own references
            t.close()
        assert _read_all(chain) == pits[n - 1]
        out = Driver.create(str(tmp_path / f"restore{n}.img"), SIZE)
        cowbackup.backup_start(chain, out).wait()
        assert _read_all(out) == pits[n - 1]
        out.close()
        chain.close()
    # Verify-on-read on a damaged copy in memory: that cluster fails, the others read.
    img0 = bytearray((moved / "b0.img").read_bytes())
    img0[3 * CS + 7] ^= 1
    mem = Driver.memory(SIZE)
    mem.write(0, bytes(img0))
    chain = cowbackup.chain_open(manifests[:1], verify=True, targets=[mem])
    with pytest.raises(Corrupt):
        chain.read(3 * CS, CS)
    assert bytes(chain.read(4 * CS, CS)) == pits[0][4 * CS:5 * CS]
    chain.close()
    # Bad input.
    ts = targets()
    with pytest.raises(InvalidArgument, match="3 manifests need as many targets, 2 given"):
        cowbackup.chain_open(manifests, targets=ts[:2])
    with pytest.raises(InvalidArgument, match="link 1"):
        cowbackup.chain_open([manifests[0], manifests[2], manifests[1]], targets=ts)
    with pytest.raises(InvalidArgument, match="link 1"):
        cowbackup.chain_open(manifests[:2], targets=[ts[0], Driver.memory(SIZE - CS)])
    with pytest.raises(TypeError, match="targets\\[1\\]"):
        cowbackup.chain_open(manifests[:2], targets=[ts[0], str(moved / "b1.img")])
    with pytest.raises(TypeError):
        cowbackup.chain_open(manifests[:1], targets=ts[0])
    closed = Driver.open(str(moved / "b0.img"))
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        cowbackup.chain_open(manifests[:1], targets=[closed])
    for t in ts:
        t.close()
