#!/usr/bin/env python3
"""Helpers of capi/nbdkit/test.sh (stdlib only).

  gen SEED CLIENTS OPS SIZE SLEEP_MS OUTDIR
      Random client workloads: OUTDIR/client<k>.cmds (qemu-io commands, one per line, a
      `sleep SLEEP_MS` between operations so they spread over the backup) and
      OUTDIR/ops.json. Client k only touches the 1 MiB stripes s with s % CLIENTS == k, so
      the clients never overlap and the final image is known whatever their interleaving.
      Operations: writes of a byte pattern at random (512-aligned) offsets and lengths,
      write-zeroes, and discards (64 KiB-aligned: the file plugin punches a hole, which
      reads as zeroes).
  expect BASE OUT OPS.json...
      OUT := BASE with every operation of the OPS files applied in order.
  clusters CLUSTER OPS.json...
      Prints how many CLUSTER-byte clusters the operations touch.
  incr-check FULL INCR EXPECTED CLUSTER OPS.json...
      FULL (an earlier full backup) with the clusters touched by the operations taken
      from INCR (an incremental backup) must equal EXPECTED, and INCR must read as zeroes
      everywhere else (it holds nothing but the dirty clusters).
"""
import json
import os
import random
import sys

MIB = 1 << 20


def gen(seed, clients, nops, size, sleep_ms, outdir):
    rng = random.Random(seed)
    stripes = size // MIB
    all_ops = []
    for k in range(clients):
        mine = [s for s in range(stripes) if s % clients == k]
        ops, lines = [], []
        for i in range(nops):
            stripe = rng.choice(mine) * MIB
            kind = rng.choices(["write", "zero", "discard"], [8, 1, 1])[0]
            if kind == "discard":
                off = stripe + rng.randrange(0, 8) * 65536
                length = rng.randrange(1, (stripe + MIB - off) // 65536 + 1) * 65536
            else:
                off = stripe + rng.randrange(0, MIB // 512) * 512
                length = rng.randrange(1, min(256 * 1024, stripe + MIB - off) // 512 + 1) * 512
            pattern = rng.randrange(1, 256)
            ops.append({"kind": kind, "offset": off, "len": length, "pattern": pattern})
            if kind == "write":
                lines.append(f"write -P {pattern} {off} {length}")
            elif kind == "zero":
                lines.append(f"write -z {off} {length}")
            else:
                lines.append(f"discard {off} {length}")
            if sleep_ms and i + 1 < nops:
                lines.append(f"sleep {sleep_ms}")
        with open(os.path.join(outdir, f"client{k}.cmds"), "w") as f:
            f.write("\n".join(lines) + "\n")
        all_ops.append(ops)
    with open(os.path.join(outdir, "ops.json"), "w") as f:
        json.dump(all_ops, f)


def load_ops(paths):
    ops = []
    for p in paths:
        with open(p) as f:
            for client in json.load(f):
                ops.extend(client)  # clients are disjoint: their order does not matter
    return ops


def expect(base, out, ops_paths):
    with open(base, "rb") as f:
        data = bytearray(f.read())
    for op in load_ops(ops_paths):
        byte = op["pattern"] if op["kind"] == "write" else 0
        data[op["offset"]:op["offset"] + op["len"]] = bytes([byte]) * op["len"]
    with open(out, "wb") as f:
        f.write(data)


def touched(cluster, ops_paths):
    result = set()
    for op in load_ops(ops_paths):
        first = op["offset"] // cluster
        last = (op["offset"] + op["len"] - 1) // cluster
        result.update(range(first, last + 1))
    return result


def incr_check(full, incr, expected, cluster, ops_paths):
    dirty = touched(cluster, ops_paths)
    with open(full, "rb") as f:
        merged = bytearray(f.read())
    with open(incr, "rb") as f:
        inc = f.read()
    with open(expected, "rb") as f:
        exp = f.read()
    if not (len(merged) == len(inc) == len(exp)):
        sys.exit("incr-check: sizes differ")
    zero = bytes(cluster)
    stray = 0
    for c in range(len(inc) // cluster):
        piece = inc[c * cluster:(c + 1) * cluster]
        if c in dirty:
            merged[c * cluster:(c + 1) * cluster] = piece
        elif piece != zero:
            stray += 1
    if stray:
        sys.exit(f"incr-check: the incremental backup holds data in {stray} clean clusters")
    if merged != exp:
        bad = sum(1 for c in range(len(exp) // cluster)
                  if merged[c * cluster:(c + 1) * cluster] != exp[c * cluster:(c + 1) * cluster])
        sys.exit(f"incr-check: full + incremental differs from the image in {bad} clusters")
    print(f"incr-check: full backup + {len(dirty)} dirty clusters of the incremental "
          f"== the image at the second start; nothing else in the incremental")


def main(argv):
    cmd = argv[1]
    if cmd == "gen":
        gen(int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]), int(argv[6]), argv[7])
    elif cmd == "expect":
        expect(argv[2], argv[3], argv[4:])
    elif cmd == "clusters":
        print(len(touched(int(argv[2]), argv[3:])))
    elif cmd == "incr-check":
        incr_check(argv[2], argv[3], argv[4], int(argv[5]), argv[6:])
    else:
        sys.exit(f"testlib: unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
