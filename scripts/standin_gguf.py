"""Write a seeded synthetic stand-in of a real GGUF model from its header alone.

Used by scripts/make-standin.sh (see there for the usual entry point):

  python standin_gguf.py full  HEADER_SRC OUT [--seed N]
  python standin_gguf.py small HEADER_SRC OUT [--seed N] [--layers 2 --embd 256
                                               --ff 512 --heads 4 --kv-heads 2]
  python standin_gguf.py check FILE          # dequantize a few blocks per type

HEADER_SRC is any file that starts with a complete GGUF header (key/values and
tensor infos), e.g. a truncated first part of a model: no tensor data is read.

`full` copies the header bytes verbatim (same metadata, names, shapes, types,
offsets) and writes, at each tensor's offset, valid synthetic data of that
tensor's type. `small` keeps the metadata (tokenizer and all) but shrinks the
hyperparameters and shapes (same tensor names and per-layer quant types).
Data is deterministic from the seed (per tensor, from its name), streamed in
chunks, and hashed while written; the sha256 is printed on stderr.

Dequantized matrices are roughly zero-mean with std ~0.02 (as a trained model's);
norm weights are ~1, biases ~0; never NaN or inf.
"""
import argparse
import hashlib
import os
import struct
import sys

import numpy as np

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i",
          F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}

# ggml types: (name, block elements, block bytes)
GGML = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
        6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
        10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
        13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
        30: ("BF16", 1, 2)}

WEIGHT_STD = 0.02


class Reader:
    def __init__(self, f):
        self.f = f

    def read(self, n):
        b = self.f.read(n)
        if len(b) != n:
            raise SystemExit("standin: header source ends inside the GGUF header")
        return b

    def scalar(self, t):
        fmt = SCALAR[t]
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self):
        n = self.scalar(U64)
        return self.read(n).decode("utf-8")

    def value(self, t):
        if t == STR:
            return self.string()
        if t == ARR:
            st = self.scalar(U32)
            n = self.scalar(U64)
            if st in SCALAR:
                fmt = SCALAR[st]
                size = struct.calcsize(fmt)
                return (st, list(np.frombuffer(self.read(n * size), dtype=np.dtype(fmt))))
            return (st, [self.value(st) for _ in range(n)])
        return self.scalar(t)


def parse_header(path):
    """-> dict(version, kvs=[(key, type, value, raw_bytes)], tensors=[...], data_offset, header)"""
    with open(path, "rb") as f:
        r = Reader(f)
        if r.read(4) != b"GGUF":
            raise SystemExit(f"standin: {path} is not a GGUF file")
        version = r.scalar(U32)
        if version != 3:
            raise SystemExit(f"standin: GGUF version {version}, expected 3")
        n_tensors = r.scalar(U64)
        n_kv = r.scalar(U64)
        kvs = []
        for _ in range(n_kv):
            start = f.tell()
            key = r.string()
            t = r.scalar(U32)
            v = r.value(t)
            end = f.tell()
            f.seek(start)
            kvs.append((key, t, v, f.read(end - start)))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            nd = r.scalar(U32)
            dims = [r.scalar(U64) for _ in range(nd)]
            typ = r.scalar(U32)
            off = r.scalar(U64)
            tensors.append(dict(name=name, dims=dims, type=typ, offset=off))
        pos = f.tell()
        align = dict((k, v) for k, _, v, _ in kvs).get("general.alignment", 32)
        data_offset = (pos + align - 1) // align * align
        f.seek(0)
        header = f.read(data_offset)
        if len(header) != data_offset:
            raise SystemExit("standin: header source ends before the data offset")
    return dict(version=version, kvs=kvs, tensors=tensors, data_offset=data_offset,
                header=header, alignment=align)


def nbytes(t):
    if t["type"] not in GGML:
        raise SystemExit(f"standin: tensor {t['name']} has ggml type {t['type']}, not supported")
    _, be, bb = GGML[t["type"]]
    n = int(np.prod(t["dims"], dtype=np.int64))
    if n % be:
        raise SystemExit(f"standin: tensor {t['name']}: {n} elements is not whole blocks")
    return n // be * bb


def rng_for(seed, name):
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    # SFC64's raw output runs at ~3 GB/s here (PCG64's bytes() at ~0.3).
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, h])))


def block_scale(rng, nb, std_per_unit):
    """Per-block scale giving weights of std WEIGHT_STD, with lognormal spread across blocks."""
    return (WEIGHT_STD / std_per_unit) * np.exp(0.25 * rng.standard_normal(nb) - 0.03)


Q4_K_DT = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
Q6_K_DT = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
Q8_0_DT = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
Q4_0_DT = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
Q5_0_DT = np.dtype([("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])
assert Q4_K_DT.itemsize == 144 and Q6_K_DT.itemsize == 210


def gen_blocks(typ, nb, rng):
    """nb blocks of ggml type typ as bytes."""
    name, be, bb = GGML[typ]
    n = nb * bb
    raw = rng.bit_generator.random_raw((n + 7) // 8).view(np.uint8)[:n]
    if name == "Q4_K":
        b = raw.view(Q4_K_DT)
        # w = d*sc*q - dmin*m, q uniform in 0..15 (mean 7.5, std 4.61).
        # sc in 24..55; m ~ sc so each sub-block is about zero-mean: dmin = 7.5 d.
        sc = 24 + rng.integers(0, 32, size=(nb, 8), dtype=np.uint8)
        m = (sc.astype(np.int16) + rng.integers(-2, 3, size=(nb, 8), dtype=np.int16))
        m = np.clip(m, 0, 63).astype(np.uint8)
        rms_sc = 40.4  # sqrt(mean(sc^2)) for sc uniform in 24..55
        d = block_scale(rng, nb, 4.61 * rms_sc)
        b["d"] = d.astype(np.float16)
        b["dmin"] = (7.5 * d).astype(np.float16)
        s = b["scales"]
        s[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
        s[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
        s[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
        b["scales"] = s
    elif name == "Q6_K":
        b = raw.view(Q6_K_DT)
        # w = d*sc*(q-32), q uniform in 0..63 (std 18.47); sc = ±(16..127) so the
        # -0.5 mean of (q-32) cancels across sub-blocks.
        mag = rng.integers(16, 128, size=(nb, 16), dtype=np.int16)
        sign = np.where(rng.integers(0, 2, size=(nb, 16), dtype=np.int8) == 1, 1, -1).astype(np.int16)
        b["scales"] = (mag * sign).astype(np.int8)
        rms_sc = 78.5
        b["d"] = block_scale(rng, nb, 18.47 * rms_sc).astype(np.float16)
    elif name == "Q8_0":
        b = raw.view(Q8_0_DT)
        b["d"] = block_scale(rng, nb, 73.9).astype(np.float16)  # int8 uniform std
    elif name == "Q4_0":
        b = raw.view(Q4_0_DT)
        b["d"] = block_scale(rng, nb, 4.61).astype(np.float16)
    elif name == "Q5_0":
        b = raw.view(Q5_0_DT)
        b["d"] = block_scale(rng, nb, 9.23).astype(np.float16)
    elif name in ("F16", "BF16", "F32"):
        w = (WEIGHT_STD * rng.standard_normal(nb)).astype(np.float32)
        if name == "F32":
            return w.tobytes()
        if name == "F16":
            return w.astype(np.float16).tobytes()
        return (w.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    else:
        raise SystemExit(f"standin: no synthetic data for type {name}")
    return memoryview(raw)  # written and hashed without a copy


def gen_f32(name, n, rng):
    if "norm" in name:
        w = 1.0 + 0.05 * rng.standard_normal(n)
    elif name.endswith(".bias"):
        w = 0.02 * rng.standard_normal(n)
    else:
        w = WEIGHT_STD * rng.standard_normal(n)
    return w.astype(np.float32).tobytes()


CHUNK_BYTES = 16 << 20


def tensor_chunks(t, seed):
    rng = rng_for(seed, t["name"])
    typ = t["type"]
    name, be, bb = GGML[typ]
    n = int(np.prod(t["dims"], dtype=np.int64))
    if typ == 0:
        # F32 tensors are small (norms, biases): one piece.
        yield gen_f32(t["name"], n, rng)
        return
    nb = n // be
    per = max(1, CHUNK_BYTES // bb)
    for i in range(0, nb, per):
        yield gen_blocks(typ, min(per, nb - i), rng)


class HashWriter:
    def __init__(self, f):
        self.f = f
        self.h = hashlib.sha256()
        self.pos = 0

    def write(self, b):
        self.f.write(b)
        self.h.update(b)
        self.pos += len(b)

    def pad_to(self, off):
        if off < self.pos:
            raise SystemExit("standin: tensor offsets overlap")
        if off > self.pos:
            self.write(b"\0" * (off - self.pos))


def write_data(w, tensors, data_offset, alignment, seed):
    for t in sorted(tensors, key=lambda t: t["offset"]):
        w.pad_to(data_offset + t["offset"])
        size = 0
        for chunk in tensor_chunks(t, seed):
            w.write(chunk)
            size += len(chunk)
        assert size == nbytes(t), t["name"]
    w.pad_to((w.pos + alignment - 1) // alignment * alignment)


def cmd_full(args):
    hdr = parse_header(args.src)
    with open(args.out, "wb") as f:
        w = HashWriter(f)
        w.write(hdr["header"])
        write_data(w, hdr["tensors"], hdr["data_offset"], hdr["alignment"], args.seed)
    print(f"standin: wrote {args.out}: {len(hdr['tensors'])} tensors, {w.pos} bytes, "
          f"sha256 {w.h.hexdigest()}", file=sys.stderr)


def enc_str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def enc_kv(key, t, v):
    if t not in SCALAR:
        raise SystemExit(f"standin: cannot re-encode {key}")
    return enc_str(key) + struct.pack("<I", t) + struct.pack(SCALAR[t], v)


def cmd_small(args):
    hdr = parse_header(args.src)
    kv = {k: (t, v) for k, t, v, _ in hdr["kvs"]}
    arch = kv["general.architecture"][1]
    n_layer_src = kv[f"{arch}.block_count"][1]
    head_dim = args.embd // args.heads
    new = {
        f"{arch}.block_count": args.layers,
        f"{arch}.embedding_length": args.embd,
        f"{arch}.feed_forward_length": args.ff,
        f"{arch}.attention.head_count": args.heads,
        f"{arch}.attention.head_count_kv": args.kv_heads,
        f"{arch}.context_length": args.ctx,
    }
    # New shape of each per-layer / global tensor, by its name's suffix.
    kv_dim = head_dim * args.kv_heads
    shapes = {
        "token_embd.weight": None, "output.weight": None,  # [embd, vocab]
        "output_norm.weight": [args.embd],
        "attn_norm.weight": [args.embd], "ffn_norm.weight": [args.embd],
        "attn_q.weight": [args.embd, args.embd], "attn_q.bias": [args.embd],
        "attn_k.weight": [args.embd, kv_dim], "attn_k.bias": [kv_dim],
        "attn_v.weight": [args.embd, kv_dim], "attn_v.bias": [kv_dim],
        "attn_output.weight": [args.embd, args.embd],
        "ffn_gate.weight": [args.embd, args.ff], "ffn_up.weight": [args.embd, args.ff],
        "ffn_down.weight": [args.ff, args.embd],
    }
    if args.layers > n_layer_src:
        raise SystemExit("standin: more layers than the source")
    tensors = []
    for t in hdr["tensors"]:
        name = t["name"]
        if name.startswith("blk."):
            layer = int(name.split(".")[1])
            if layer >= args.layers:
                continue
            suffix = name.split(".", 2)[2]
        else:
            suffix = name
        if suffix not in shapes:
            raise SystemExit(f"standin: no small shape for {name}")
        dims = shapes[suffix] or [args.embd, t["dims"][1]]
        typ = t["type"]
        be = GGML[typ][1]
        if dims[0] % be:
            raise SystemExit(f"standin: {name}: row of {dims[0]} is not whole {GGML[typ][0]} blocks")
        tensors.append(dict(name=name, dims=dims, type=typ, offset=0))
    align = hdr["alignment"]
    off = 0
    for t in tensors:
        t["offset"] = off
        off = (off + nbytes(t) + align - 1) // align * align

    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(hdr["kvs"])))
    for k, t, v, raw in hdr["kvs"]:
        if k == "general.name":
            head += enc_str(k) + struct.pack("<I", STR) + enc_str(f"{v} (synthetic small stand-in)")
        elif k == "general.size_label":
            n = sum(int(np.prod(t["dims"], dtype=np.int64)) for t in tensors)
            head += enc_str(k) + struct.pack("<I", STR) + enc_str(f"{round(n / 1e6)}M")
        elif k in new:
            head += enc_kv(k, t, new[k])
        else:
            head += raw
    for t in tensors:
        head += enc_str(t["name"]) + struct.pack("<I", len(t["dims"]))
        head += struct.pack(f"<{len(t['dims'])}Q", *t["dims"])
        head += struct.pack("<IQ", t["type"], t["offset"])
    data_offset = (len(head) + align - 1) // align * align
    head += b"\0" * (data_offset - len(head))
    with open(args.out, "wb") as f:
        w = HashWriter(f)
        w.write(bytes(head))
        write_data(w, tensors, data_offset, align, args.seed)
    print(f"standin: wrote {args.out}: {len(tensors)} tensors, {w.pos} bytes, "
          f"sha256 {w.h.hexdigest()}", file=sys.stderr)


def cmd_check(args):
    """Dequantize a few blocks of each tensor type with gguf-py; print stats."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    r = gguf.GGUFReader(args.file)
    seen = {}
    for t in r.tensors:
        kind = "norm" if "norm" in t.name else "bias" if t.name.endswith(".bias") else "matrix"
        key = (t.tensor_type.name, kind)
        if key in seen and seen[key] >= 3:
            continue
        seen[key] = seen.get(key, 0) + 1
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        if t.tensor_type == Q.F32:
            x = raw.view(np.float32)
        else:
            _, bb = gguf.GGML_QUANT_SIZES[t.tensor_type]
            x = gguf.quants.dequantize(raw[: 64 * bb], t.tensor_type)
        x = x.astype(np.float64)
        ok = np.isfinite(x).all()
        print(f"{t.name:32} {t.tensor_type.name:5} mean {x.mean():+.5f} std {x.std():.5f} "
              f"min {x.min():+.4f} max {x.max():+.4f} finite {ok}")
        if not ok:
            raise SystemExit("standin: non-finite values")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("full", "small"):
        p = sub.add_parser(name)
        p.add_argument("src")
        p.add_argument("out")
        p.add_argument("--seed", type=int, default=0)
        if name == "small":
            p.add_argument("--layers", type=int, default=2)
            p.add_argument("--embd", type=int, default=256)
            p.add_argument("--ff", type=int, default=512)
            p.add_argument("--heads", type=int, default=4)
            p.add_argument("--kv-heads", type=int, default=2)
            p.add_argument("--ctx", type=int, default=4096)
    p = sub.add_parser("check")
    p.add_argument("file")
    args = ap.parse_args()
    {"full": cmd_full, "small": cmd_small, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    main()
