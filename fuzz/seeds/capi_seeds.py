#!/usr/bin/env python3
"""Write the seed programs of the `capi` fuzz target into fuzz/corpus/capi/.

Each seed is a short program in the target's byte encoding (see fuzz_targets/capi.rs,
`World::step`): drivers, options, a job, host writes through the hook, a wait. The fuzzer
mutates them; without seeds it needs long to find a job that completes.
Run: python3 fuzz/seeds/capi_seeds.py (from anywhere)."""
import os

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus", "capi")


def u16(v):
    return [v & 0xFF, v >> 8]


def mem(slot, pages, fill=0):
    b = [0, 4] + u16(pages - 1) + [0, slot, fill]
    if fill:
        b += [6] + u16(1) + u16(0x100)  # one run at 512, 4 KiB long
    return b


def cdrv(slot, pages, fail=0, mask=0b1111):
    # dev size, fail_every, errno, no lie, ops mask, ops_size = sizeof, flags 0, out, ops, slot
    return [1, 4] + u16(pages - 1) + [fail, 0, 0, mask, 0, 0, 0, 0, slot]


def opts_new(i):
    return [3, i]


def setopt(i, which, sel):
    return [4, i] + sel + [which]


def start(s, t, o):
    return [6, s, t, o, 0]


def hostwrite(slot, off512, len512, fill=0x77):
    return [8, slot, 1, 6] + u16(off512) + [6] + u16(len512) + [fill, 0]


def wait(j, finish=1):
    return [12, j, finish]


def snapshot(j, slot):
    return [14, j, 0, slot]


def read(slot, off512, len512):
    return [15, slot, 6] + u16(off512) + [6] + u16(len512) + [0, 0]


def bm_new(i, pages):
    # bitmap_step: slot, op 0 (new), dev_size, granularity 4096 (pick 1), not a file
    return [17, i, 0, 4] + u16(pages - 1) + [1, 1]


def bm_mark(i, off512, len512):
    return [17, i, 3, 6] + u16(off512) + [6] + u16(len512)


CLUSTER_4K = [1, 12]  # value(): 1 << 12
BYTE = lambda b: [2, b]  # value(): the byte

seeds = {
    "full": mem(0, 16, 0x11) + mem(1, 16) + opts_new(0) + setopt(0, 0, CLUSTER_4K) + start(0, 1, 0)
    + hostwrite(0, 2, 16) + hostwrite(0, 100, 8) + wait(0),
    "stop-resume": mem(0, 32, 0x22) + cdrv(1, 32, fail=4) + opts_new(0) + setopt(0, 0, CLUSTER_4K)
    + setopt(0, 6, BYTE(2)) + start(0, 1, 0) + hostwrite(0, 0, 64) + wait(0),
    "ignore": cdrv(0, 16, fail=6) + mem(1, 16) + opts_new(0) + setopt(0, 5, BYTE(1)) + start(0, 1, 0) + wait(0),
    "fleece": mem(0, 16, 0x33) + mem(1, 16) + opts_new(0) + setopt(0, 1, BYTE(2)) + start(0, 1, 0)
    + snapshot(0, 2) + hostwrite(0, 4, 8) + read(2, 0, 64) + wait(0),
    "incremental": mem(0, 16, 0x44) + mem(1, 16) + bm_new(0, 16) + bm_mark(0, 8, 8) + opts_new(0)
    + setopt(0, 0, CLUSTER_4K) + setopt(0, 1, BYTE(3)) + setopt(0, 11, BYTE(0)) + [0]
    + start(0, 1, 0) + hostwrite(0, 8, 2) + wait(0),
    "group": mem(0, 8, 0x55) + mem(1, 8) + mem(2, 8, 0x66) + mem(3, 8) + [19, 2, 0, 1, 4, 2, 3, 4, 1, 0]
    + hostwrite(0, 1, 1) + wait(0) + wait(1),
    "throttled-cancel": mem(0, 64, 0x12) + mem(1, 64) + opts_new(0) + setopt(0, 2, BYTE(100))
    + setopt(0, 3, BYTE(8)) + start(0, 1, 0) + [11, 0, 0, 0] + hostwrite(0, 3, 3) + [11, 0, 0, 2] + wait(0, 0),
}

os.makedirs(OUT, exist_ok=True)
for name, prog in seeds.items():
    with open(os.path.join(OUT, "seed-" + name), "wb") as f:
        f.write(bytes(prog))
print(f"{len(seeds)} seeds in {os.path.normpath(OUT)}")
