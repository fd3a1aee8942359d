#!/usr/bin/env python3
"""Writes the seed corpus of the `nbd` fuzz target (fuzz/corpus/nbd/): well-formed
conversations, so the fuzzer starts from inputs that reach the transmission phase.
Run from the repository root: python3 fuzz/seeds/nbd_seeds.py"""
import os
import struct

IHAVEOPT = 0x49484156454F5054
REQ = 0x25609513


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go(name, infos=(3,)):
    n = name.encode()
    return opt(7, struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))


def meta(code, export, queries):
    e = export.encode()
    body = struct.pack(">I", len(e)) + e + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q)) + q.encode()
    return opt(code, body)


def req(cmd, off, length, cookie=1, flags=0, payload=b""):
    return struct.pack(">IHHQQI", REQ, flags, cmd, cookie, off, length) + payload


flags = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
seeds = {
    "read-ro": flags + opt(8) + meta(10, "ro", ["base:allocation", "qemu:dirty-bitmap:b0"]) + go("ro")
    + req(0, 0, 4096) + req(7, 0, 1 << 20, cookie=2) + req(2, 0, 0, cookie=3),
    "write-rw": flags + opt(8) + go("rw") + req(1, 4096, 16, payload=b"x" * 16) + req(6, 0, 65536, cookie=2)
    + req(4, 65536, 65536, cookie=3) + req(3, 0, 0, cookie=4) + req(2, 0, 0, cookie=5),
    "list": flags + opt(3) + meta(9, "ro", ["qemu:"]) + opt(6, go("ro")[16:]) + opt(2),
    "export-name": flags + opt(1, b"ro") + req(0, 1 << 19, 512) + req(2, 0, 0),
    "simple-replies": flags + go("ro") + req(0, (1 << 20) - 512, 1024) + req(0, 2**64 - 512, 1024, cookie=9),
}
# Mode 1: what a server sends a client.
greeting = struct.pack(">QQH", 0x4E42444D41474943, IHAVEOPT, 3)
rep = lambda o, t, d=b"": struct.pack(">QIII", 0x0003E889045565A9, o, t, len(d)) + d
info = rep(7, 3, struct.pack(">HQH", 0, 1 << 20, 0x1 | 0x100))
chunk_data = struct.pack(">IHHQI", 0x668E33EF, 1, 1, 1, 8 + 16) + struct.pack(">Q", 0) + b"y" * 16
client_seed = greeting + rep(8, 1) + info + rep(7, 1) + chunk_data
out = "fuzz/corpus/nbd"
os.makedirs(out, exist_ok=True)
for name, body in seeds.items():
    for mode in (0, 2):
        with open(os.path.join(out, f"seed-{name}-{mode}"), "wb") as f:
            f.write(bytes([mode]) + body)
with open(os.path.join(out, "seed-client-1"), "wb") as f:
    f.write(bytes([1]) + client_seed)
